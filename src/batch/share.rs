//! Turns on the CPU for the models that share it.
//!
//! Each model's worker runs libtorch with as many intra-op threads as there are cores. Two
//! workers running at once oversubscribe the cores and the slower model starves: measured with
//! the classifier saturated by 16 clients on 2 cores, 52 of 184 detector requests waited their
//! whole 60 s. So a run takes a turn first: one model computes at a time, with all the cores,
//! and when several wait, the turn goes to the one that has used the least CPU time for its
//! weight (start-time fair queuing: a model that was idle joins at the current virtual time, so
//! it cannot claim back the time it did not ask for). A worker is not idle in the moments
//! between two runs (answering, gathering its next batch): the turn is held for it for `HOLD`
//! when its credit is the best, and one back within `GRACE` keeps the credit it has; without
//! both, a model of short runs would get one turn per turn of a model of long ones.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a model may go between turns and still count as busy.
const GRACE: Duration = Duration::from_millis(250);
/// How long the turn waits for a model that just had one and is owed more (its worker answers
/// and gathers its next batch, `--max-batch-delay-ms` 5 by default, in that time).
const HOLD: Duration = Duration::from_millis(20);

/// Whose turn it is when the CPU is free.
#[derive(Debug, PartialEq)]
enum Next {
    Grant(u64),
    /// Owed to a model between two runs, until then.
    Hold(Instant),
    Nobody,
}

#[derive(Default)]
pub struct CpuShare {
    state: Mutex<State>,
    free: Condvar,
}

#[derive(Default)]
struct State {
    busy: bool,
    /// The member whose turn it is.
    holder: Option<u64>,
    /// The virtual time of the last turn granted.
    clock: f64,
    members: Vec<MemberState>,
    next_id: u64,
    next_ticket: u64,
}

struct MemberState {
    id: u64,
    weight: f64,
    /// CPU seconds used, divided by the weight.
    used: f64,
    /// When waiting: its place in line among equals.
    waiting: Option<u64>,
    /// When its last turn ended.
    released: Option<Instant>,
}

impl CpuShare {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A model taking turns with `weight` (its share when every model waits is its weight over
    /// the sum of the weights).
    pub fn join(self: &Arc<Self>, weight: f64) -> Member {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        let used = state.clock;
        state.members.push(MemberState {
            id,
            weight: if weight > 0.0 { weight } else { 1.0 },
            used,
            waiting: None,
            released: None,
        });
        Member {
            share: self.clone(),
            id,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    fn member(&mut self, id: u64) -> Option<&mut MemberState> {
        self.members.iter_mut().find(|m| m.id == id)
    }

    /// Whose turn it is: the waiting member that has used least, then first in line; held
    /// when a member that has just had a turn has used less still.
    fn next(&self) -> Next {
        let now = Instant::now();
        let candidate = |m: &MemberState| match (m.waiting, m.released) {
            (Some(ticket), _) => Some((m.used, ticket, m.id, None)),
            (None, Some(r)) if now < r + HOLD => Some((m.used, u64::MAX, m.id, Some(r + HOLD))),
            _ => None,
        };
        let best = self
            .members
            .iter()
            .filter_map(candidate)
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        match best {
            Some((_, _, _, Some(until))) => Next::Hold(until),
            Some((_, _, id, None)) => Next::Grant(id),
            None => Next::Nobody,
        }
    }
}

/// One model's place in the share; leaves it when dropped.
pub struct Member {
    share: Arc<CpuShare>,
    id: u64,
}

impl Member {
    /// Blocks until it is this model's turn; the turn lasts until the guard is dropped.
    pub fn turn(&self) -> Turn<'_> {
        let mut state = self.share.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        let clock = state.clock;
        if let Some(me) = state.member(self.id) {
            let busy = me.released.is_some_and(|r| r.elapsed() < GRACE);
            if !busy {
                me.used = me.used.max(clock);
            }
            me.waiting = Some(ticket);
        }
        loop {
            let next = if state.busy {
                Next::Nobody
            } else {
                state.next()
            };
            let free = &self.share.free;
            state = match next {
                Next::Grant(id) if id == self.id => break,
                Next::Hold(until) => {
                    let wait = until.saturating_duration_since(Instant::now());
                    free.wait_timeout(state, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                _ => free.wait(state).unwrap_or_else(|e| e.into_inner()),
            };
        }
        state.busy = true;
        state.holder = Some(self.id);
        if let Some(me) = state.member(self.id) {
            me.waiting = None;
            let used = me.used;
            state.clock = used;
        }
        Turn {
            member: self,
            started: Instant::now(),
        }
    }
}

impl Member {
    /// How much longer than its own CPU time a model's work takes now: 1 alone, and with other
    /// models busy (waiting, computing, or between two runs) the sum of their weights and its
    /// own over its own, as if they stay busy while it works (at the onset of contention the
    /// estimate is right at once; after it, at once too).
    pub fn contention(&self) -> f64 {
        let state = self.share.lock();
        let now = Instant::now();
        let holder = state.holder;
        let busy = |m: &&MemberState| {
            m.waiting.is_some()
                || holder == Some(m.id)
                || m.released.is_some_and(|r| now < r + GRACE)
        };
        let mine = state
            .members
            .iter()
            .find(|m| m.id == self.id)
            .map_or(1.0, |m| m.weight);
        let others: f64 = state
            .members
            .iter()
            .filter(|m| m.id != self.id)
            .filter(busy)
            .map(|m| m.weight)
            .sum();
        (mine + others) / mine
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut state = self.share.lock();
        state.members.retain(|m| m.id != self.id);
        drop(state);
        self.share.free.notify_all();
    }
}

/// A model's turn on the CPU.
pub struct Turn<'a> {
    member: &'a Member,
    started: Instant,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let took = self.started.elapsed().as_secs_f64();
        let share = &self.member.share;
        let mut state = share.lock();
        if let Some(me) = state.member(self.member.id) {
            me.used += took / me.weight;
            me.released = Some(Instant::now());
        }
        state.busy = false;
        state.holder = None;
        drop(state);
        share.free.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Two members each wanting turns of `ms` milliseconds back to back for 600 ms; the time
    /// each spent in its turns, in milliseconds.
    fn contend(weights: [f64; 2], ms: [u64; 2]) -> [f64; 2] {
        let share = CpuShare::new();
        let until = Instant::now() + Duration::from_millis(600);
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let member = share.join(weights[i]);
                std::thread::spawn(move || {
                    let mut inside = Duration::ZERO;
                    while Instant::now() < until {
                        let _turn = member.turn();
                        let started = Instant::now();
                        std::thread::sleep(Duration::from_millis(ms[i]));
                        inside += started.elapsed();
                    }
                    inside.as_secs_f64() * 1000.0
                })
            })
            .collect();
        let mut times = threads.into_iter().map(|t| t.join().expect("thread"));
        [times.next().unwrap_or(0.0), times.next().unwrap_or(0.0)]
    }

    #[test]
    fn equal_weights_share_time_not_turns() {
        // Turns of 40 ms against turns of 4 ms: about equal time each.
        let [long, short] = contend([1.0, 1.0], [40, 4]);
        assert!(
            (long / short - 1.0).abs() < 0.35,
            "{long:.0} ms in turns of 40 ms, {short:.0} ms in turns of 4 ms"
        );
    }

    #[test]
    fn weights_set_the_shares() {
        let [a, b] = contend([3.0, 1.0], [10, 10]);
        let ratio = a / b;
        assert!((2.0..=4.5).contains(&ratio), "{a:.0} ms against {b:.0} ms");
    }

    #[test]
    fn contention_counts_the_other_busy_models_by_weight() {
        let share = CpuShare::new();
        let a = share.join(1.0);
        let b = share.join(3.0);
        assert_eq!(a.contention(), 1.0);
        let turn = b.turn();
        assert_eq!(a.contention(), 4.0);
        assert_eq!(b.contention(), 1.0, "`a` is idle");
        drop(turn);
        // Between two runs, `b` still counts; after the grace it does not.
        assert_eq!(a.contention(), 4.0);
        std::thread::sleep(GRACE);
        assert_eq!(a.contention(), 1.0);
    }

    #[test]
    fn one_turn_at_a_time() {
        let share = CpuShare::new();
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let member = share.join(1.0);
                let inside = inside.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let _turn = member.turn();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        std::thread::sleep(Duration::from_millis(1));
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no two turns at once");
        }
    }

    #[test]
    fn a_member_back_from_idle_does_not_claim_the_past() {
        let share = CpuShare::new();
        let busy = share.join(1.0);
        let idle = share.join(1.0);
        for _ in 0..5 {
            let _t = busy.turn();
            std::thread::sleep(Duration::from_millis(5));
        }
        // `idle` joins at the clock: its used time is not 25 ms behind.
        std::thread::sleep(GRACE);
        drop(idle.turn());
        let state = share.lock();
        let used: Vec<f64> = state.members.iter().map(|m| m.used).collect();
        assert!(used[1] >= state.clock - 1e-9 && used[1] > 0.0, "{used:?}");
    }
}
