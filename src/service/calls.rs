//! What every edge does around a request, in one place: the key check, and the call's life
//! (in flight for the drain, timed, counted by endpoint and outcome in the request metrics).

use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use super::{InFlight, Service};

/// A key callers present as `authorization: Bearer KEY` (HTTP header or gRPC metadata). With
/// none set, everything is open.
#[derive(Clone, Debug, Default)]
pub struct Key(Option<String>);

impl Key {
    pub fn new(key: Option<String>) -> Self {
        Self(key)
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Whether a presented `authorization` value opens it: compared in constant time, so the
    /// time taken tells nothing of how much of a guess was right.
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        let Some(key) = &self.0 else {
            return true;
        };
        let given = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        bool::from(given.as_bytes().ct_eq(key.as_bytes()))
    }
}

/// One request at an edge from arrival to answer: counted in flight while it lives (a drain
/// waits for it), and recorded by `finish` under its endpoint (a bounded set of names: route
/// templates, RPC methods) and outcome (an HTTP status, a gRPC code).
pub struct Call<'a> {
    service: &'a Service,
    endpoint: String,
    started: Instant,
    _in_flight: InFlight<'a>,
}

impl Service {
    /// Starts a call at `endpoint`.
    pub fn call(&self, endpoint: impl Into<String>) -> Call<'_> {
        Call {
            service: self,
            endpoint: endpoint.into(),
            started: Instant::now(),
            _in_flight: self.admission.enter(),
        }
    }
}

impl Call<'_> {
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Records the call's outcome and duration; the duration, for the edge's own use.
    pub fn finish(self, outcome: &str) -> Duration {
        let elapsed = self.started.elapsed();
        let metrics = &self.service.metrics;
        metrics
            .requests
            .with_label_values(&[&self.endpoint, outcome])
            .inc();
        metrics
            .request_duration
            .with_label_values(&[&self.endpoint])
            .observe(elapsed.as_secs_f64());
        elapsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_opens_only_to_its_bearer() {
        let key = Key::new(Some("sesame".into()));
        assert!(key.allows(Some("Bearer sesame")));
        for wrong in [
            None,
            Some("sesame"),
            Some("Bearer sesam"),
            Some("Bearer sesame2"),
        ] {
            assert!(!key.allows(wrong), "{wrong:?}");
        }
        assert!(Key::default().allows(None), "no key set: open");
    }
}
