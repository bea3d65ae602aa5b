//! `detectd healthcheck`: the container's HEALTHCHECK, so the image needs no curl and the check
//! follows the port the server was told to listen on (the same `DETECTD_LISTEN`).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

#[derive(Args, Debug)]
pub struct HealthcheckArgs {
    /// The address `serve` listens on (the same DETECTD_LISTEN; a `serve --listen` flag is not
    /// seen here); a wildcard (0.0.0.0, [::]) is asked on loopback.
    #[arg(long, env = "DETECTD_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Ask /readyz (models loaded and warm, not draining) instead of /healthz (the process
    /// serves): for a readiness check, like compose's `up --wait`.
    #[arg(long)]
    pub ready: bool,
    /// Give up after this long (connect and answer together).
    #[arg(long, default_value_t = 3.0)]
    pub timeout_s: f64,
}

/// Exit 0 when `/healthz` (or `/readyz`) answers 200, 1 otherwise (with the reason on
/// stderr), as Docker's HEALTHCHECK and Kubernetes' exec probes read it.
pub fn run(args: HealthcheckArgs) -> anyhow::Result<ExitCode> {
    let path = if args.ready { "readyz" } else { "healthz" };
    let url = format!("http://{}/{path}", loopback_for(args.listen));
    let timeout = Duration::try_from_secs_f64(args.timeout_s.max(0.001))
        .map_err(|e| anyhow::anyhow!("--timeout-s {}: {e}", args.timeout_s))?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        // The server is on this host: an HTTP(S)_PROXY set for fetching weights must not
        // carry the check elsewhere.
        .proxy(None)
        .build()
        .into();
    match agent.get(&url).call() {
        Ok(response) if response.status() == 200 => Ok(ExitCode::SUCCESS),
        Ok(response) => {
            eprintln!("detectd healthcheck: {url} answered {}", response.status());
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("detectd healthcheck: {url}: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// A server bound to every address is reached on loopback; a specific address as it is.
fn loopback_for(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_are_asked_on_loopback() {
        let cases = [
            ("0.0.0.0:9000", "127.0.0.1:9000"),
            ("[::]:9000", "[::1]:9000"),
            ("10.1.2.3:8080", "10.1.2.3:8080"),
        ];
        for (listen, asked) in cases {
            assert_eq!(loopback_for(listen.parse().unwrap()).to_string(), asked);
        }
    }
}
