//! Rate-limited log lines, for events that a client can cause as often as it likes
//! (a wrong password, a connection attempt while descriptors are exhausted).
//!
//! Logging each one would let a flood fill the disk and bury every other line, and
//! logging none would hide an attack. A [`RateLimit`] lets one line through per
//! interval and counts the ones it held back, so the next line that passes can say how
//! many there were. It is a pure core: the caller passes the time, so tests need no
//! clock, and the caller formats and emits the line itself.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// At most one log line per `interval`; counts the events it suppresses.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When a line was last let through.
    last: Option<Instant>,
    /// Events since then that were not logged.
    suppressed: u64,
}

impl RateLimit {
    /// A limiter that lets one line through per `interval`.
    pub const fn new(interval: Duration) -> RateLimit {
        RateLimit {
            interval,
            state: Mutex::new(State {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Records an event at `now`. `Some(n)`: log it now, and say that `n` earlier ones
    /// were suppressed; `None`: stay quiet (it is counted for the next line).
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut st = self.state.lock();
        match st.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                st.suppressed += 1;
                None
            }
            _ => {
                st.last = Some(now);
                Some(std::mem::take(&mut st.suppressed))
            }
        }
    }
}

/// " (N similar lines suppressed)" for a count above zero, else "".
pub fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar events not logged since the last line)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_of_the_rest() {
        let r = RateLimit::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(r.check(t0), Some(0));
        for ms in [1, 10, 500, 999] {
            assert_eq!(r.check(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(r.check(t0 + Duration::from_millis(1000)), Some(4));
        assert_eq!(r.check(t0 + Duration::from_millis(1001)), None);
        assert_eq!(r.check(t0 + Duration::from_secs(5)), Some(1));
        assert_eq!(r.check(t0 + Duration::from_secs(7)), Some(0));
        assert_eq!(suppressed_note(0), "");
        assert!(suppressed_note(4).contains('4'));
    }
}
