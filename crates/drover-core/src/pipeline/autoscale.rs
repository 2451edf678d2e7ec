//! The autoscaler's decision for one vertex, as a pure function of the vertex's scale
//! settings, what was last measured, and what it decided before.
//!
//! The rule is NumaFlow's: a vertex should have enough replicas to work off what is
//! pending in its input within `target_processing_seconds`, given how fast one replica
//! processes. The answer is clamped to `min..=max`, moves at most `replicas_per_step` at
//! a time, waits out a cooldown after each change, does not add replicas while a
//! downstream buffer is full (they would only wait), drops to zero after a quiet spell
//! when `min` is 0, and wakes a vertex at zero as soon as something is pending.

use super::spec::DesiredPhase;
use crate::Millis;
use crate::quantity::Dur;
use crate::spec::MAX_COUNT;
use serde::{Deserialize, Serialize};

/// `scale`: how many replicas a vertex may have and how the autoscaler moves between
/// them. Every knob has a default, so `scale: { max: 5 }` is a whole setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScaleConfig {
    pub min: u32,
    pub max: u32,
    /// How soon the pending messages should be worked off.
    pub target_processing_seconds: Dur,
    /// The most replicas added or removed in one decision.
    pub replicas_per_step: u32,
    /// The wait after any change before replicas are added.
    pub scale_up_cooldown: Dur,
    /// The wait after any change before replicas are removed.
    pub scale_down_cooldown: Dur,
    /// How long nothing must be pending before a vertex with `min: 0` goes to zero.
    pub zero_after: Dur,
}

pub const DEFAULT_TARGET_PROCESSING: Dur = Dur::from_secs(20);
pub const DEFAULT_REPLICAS_PER_STEP: u32 = 2;
pub const DEFAULT_COOLDOWN: Dur = Dur::from_secs(90);
pub const DEFAULT_ZERO_AFTER: Dur = Dur::from_secs(120);
/// The longest of the autoscaler's durations: a vertex that reacts more slowly than
/// hourly is not being autoscaled.
pub const MAX_SCALE_DURATION: Dur = Dur::from_secs(60 * 60);

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            min: 1,
            max: 1,
            target_processing_seconds: DEFAULT_TARGET_PROCESSING,
            replicas_per_step: DEFAULT_REPLICAS_PER_STEP,
            scale_up_cooldown: DEFAULT_COOLDOWN,
            scale_down_cooldown: DEFAULT_COOLDOWN,
            zero_after: DEFAULT_ZERO_AFTER,
        }
    }
}

impl ScaleConfig {
    /// Checks the bounds; the message starts with the field's path under `at`.
    pub fn validate(&self, at: &str) -> Result<(), String> {
        if self.max > MAX_COUNT {
            return Err(format!(
                "{at}.max: expected at most {MAX_COUNT}, got {}",
                self.max
            ));
        }
        if self.min > self.max {
            return Err(format!(
                "{at}.min: {} is more than max {}; expected min <= max",
                self.min, self.max
            ));
        }
        if self.replicas_per_step == 0 || self.replicas_per_step > MAX_COUNT {
            return Err(format!(
                "{at}.replicas_per_step: expected 1 to {MAX_COUNT}, got {}",
                self.replicas_per_step
            ));
        }
        if self.target_processing_seconds.as_millis() < 1000 {
            return Err(format!(
                "{at}.target_processing_seconds: expected at least 1s, got {}",
                self.target_processing_seconds
            ));
        }
        for (field, value) in [
            ("target_processing_seconds", self.target_processing_seconds),
            ("scale_up_cooldown", self.scale_up_cooldown),
            ("scale_down_cooldown", self.scale_down_cooldown),
            ("zero_after", self.zero_after),
        ] {
            if value > MAX_SCALE_DURATION {
                return Err(format!(
                    "{at}.{field}: expected at most {}, got {value}",
                    crate::spec::bound_text(MAX_SCALE_DURATION)
                ));
            }
        }
        Ok(())
    }

    /// `n` within `min..=max`.
    pub fn clamp(&self, n: u32) -> u32 {
        n.clamp(self.min, self.max.max(self.min))
    }
}

/// What was measured of a vertex just now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Messages waiting in the vertex's input, over all partitions; `None` when not
    /// known (no reading yet, or a source that cannot tell).
    pub pending: Option<u64>,
    /// Messages the vertex's replicas hold and have not acknowledged yet, over all
    /// partitions. A replica fetches ahead of what it processes, so a busy vertex can
    /// show nothing pending; it is idle only when this is zero too.
    #[serde(default)]
    pub unacked: u64,
    /// Messages one replica processes per second, averaged over a recent window;
    /// `None` before any data has been processed.
    pub rate_per_replica: Option<f64>,
    /// The downstream buffer that is at its usage limit, if any.
    pub backpressure: Option<String>,
}

/// What the autoscaler needs to remember between decisions. Kept in the vertex's
/// status, so a restarted controller decides as the old one would have.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleState {
    /// The replicas the vertex's spec asks for now.
    pub replicas: u32,
    /// The phase written into the vertex's spec.
    pub phase: DesiredPhase,
    /// When the replica count last changed.
    pub last_scaled_at: Option<Millis>,
    /// Since when nothing has been pending; `None` while something is.
    pub idle_since: Option<Millis>,
}

/// The autoscaler's answer: the replica count to write into the vertex's spec, why, and
/// the state to keep for the next decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub replicas: u32,
    /// A sentence for `drover pipeline status`.
    pub reason: String,
    pub state: ScaleState,
}

/// Decides the replica count of one vertex. Pure: the same arguments give the same
/// decision, whatever happened before, so it can be tested as a table and replayed.
pub fn decide(cfg: &ScaleConfig, obs: &Observation, state: &ScaleState, now: Millis) -> Decision {
    let current = state.replicas;
    if state.phase != DesiredPhase::Running {
        return hold(state, current, "paused".into());
    }
    let Some(pending) = obs.pending else {
        return hold(
            state,
            current,
            format!("holding at {current}: pending messages not measured yet"),
        );
    };
    let mut next = state.clone();
    next.idle_since = if pending == 0 && obs.unacked == 0 {
        state.idle_since.or(Some(now))
    } else {
        None
    };
    let outside = cfg.clamp(current);
    if current == 0 && pending > 0 {
        let to = cfg.clamp(1);
        if to == 0 {
            return hold(&next, 0, "at 0: max is 0".into());
        }
        let why = format!("woken from 0 to {to}: {} pending", thousands(pending));
        return change(next, to, why, now);
    }
    if outside != current {
        let why = format!(
            "scaled from {current} to {outside} to stay within min {} and max {}",
            cfg.min, cfg.max
        );
        return change(next, outside, why, now);
    }
    if let Some(d) = to_zero(cfg, pending + obs.unacked, &next, current, now) {
        return d;
    }
    if current == 0 {
        return hold(&next, 0, "at 0: nothing pending".into());
    }
    by_rate(cfg, obs, pending, next, now)
}

/// A vertex with `min: 0` goes to zero once nothing has been pending or in flight for
/// `zero_after`.
fn to_zero(
    cfg: &ScaleConfig,
    occupied: u64,
    next: &ScaleState,
    current: u32,
    now: Millis,
) -> Option<Decision> {
    let idle_since = next.idle_since?;
    let quiet = now.saturating_sub(idle_since) >= crate::duration_millis(cfg.zero_after.0);
    if cfg.min > 0 || occupied > 0 || current == 0 || !quiet {
        return None;
    }
    let why = format!(
        "scaled down from {current} to 0: nothing pending or in flight for {}",
        cfg.zero_after
    );
    Some(change(next.clone(), 0, why, now))
}

/// The rate rule, with the step limit, the cooldowns and back-pressure.
fn by_rate(
    cfg: &ScaleConfig,
    obs: &Observation,
    pending: u64,
    next: ScaleState,
    now: Millis,
) -> Decision {
    let current = next.replicas;
    let Some(rate) = obs.rate_per_replica.filter(|r| r.is_finite() && *r > 0.0) else {
        let why = format!("holding at {current}: no processing rate measured yet");
        return hold(&next, current, why);
    };
    let per_replica = rate * cfg.target_processing_seconds.0.as_secs_f64();
    // Even with nothing pending a running vertex keeps one replica: going to zero is
    // the quiet-spell rule's decision, not the rate rule's.
    let wanted = (pending as f64 / per_replica)
        .ceil()
        .min(f64::from(MAX_COUNT)) as u32;
    let desired = cfg.clamp(wanted.max(1));
    let load = format!(
        "{} pending at {}/s per replica",
        thousands(pending),
        rate_text(rate)
    );
    if desired == current {
        return hold(&next, current, format!("holding at {current}: {load}"));
    }
    let up = desired > current;
    let cooldown = if up {
        cfg.scale_up_cooldown
    } else {
        cfg.scale_down_cooldown
    };
    if let Some(since) = next.last_scaled_at {
        let until = since.saturating_add(crate::duration_millis(cooldown.0));
        if now < until {
            let why = format!(
                "holding at {current} (wants {desired}): cooling down for {} more; {load}",
                Dur::from_millis(u64::try_from(until - now).unwrap_or(0))
            );
            return hold(&next, current, why);
        }
    }
    if up && let Some(buffer) = &obs.backpressure {
        let why = format!(
            "holding at {current} (wants {desired}): downstream buffer {buffer} is full; {load}"
        );
        return hold(&next, current, why);
    }
    let step = cfg.replicas_per_step;
    let to = if up {
        desired.min(current.saturating_add(step))
    } else {
        desired.max(current.saturating_sub(step))
    };
    let verb = if up { "up" } else { "down" };
    change(
        next,
        to,
        format!("scaled {verb} from {current} to {to}: {load}"),
        now,
    )
}

fn hold(state: &ScaleState, replicas: u32, reason: String) -> Decision {
    Decision {
        replicas,
        reason,
        state: state.clone(),
    }
}

fn change(mut state: ScaleState, to: u32, reason: String, now: Millis) -> Decision {
    state.replicas = to;
    state.last_scaled_at = Some(now);
    Decision {
        replicas: to,
        reason,
        state,
    }
}

/// `12000` as `12,000`, the way a person reads a count.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate as a person reads it: whole above 10 a second, one decimal below.
fn rate_text(rate: f64) -> String {
    if rate >= 10.0 {
        thousands(rate.round() as u64)
    } else {
        format!("{rate:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Millis = 1000;
    const T0: Millis = 1_000_000;

    fn cfg(min: u32, max: u32) -> ScaleConfig {
        ScaleConfig {
            min,
            max,
            ..ScaleConfig::default()
        }
    }

    fn obs(pending: Option<u64>, rate: Option<f64>) -> Observation {
        Observation {
            pending,
            unacked: 0,
            rate_per_replica: rate,
            backpressure: None,
        }
    }

    fn state(replicas: u32, last: Option<Millis>, idle: Option<Millis>) -> ScaleState {
        ScaleState {
            replicas,
            phase: DesiredPhase::Running,
            last_scaled_at: last,
            idle_since: idle,
        }
    }

    #[test]
    fn decisions_follow_the_rate_rule_and_its_limits() {
        let full = Observation {
            backpressure: Some("default.etl.out.0".into()),
            ..obs(Some(12_000), Some(100.0))
        };
        let paused = ScaleState {
            phase: DesiredPhase::Paused,
            ..state(3, None, None)
        };
        let long_ago = Some(T0 - 600 * S);
        // (name, config, observation, state, replicas, reason)
        let cases: Vec<(&str, ScaleConfig, Observation, ScaleState, u32, &str)> = vec![
            (
                "12,000 pending at 800/s over 5s wants 3",
                ScaleConfig {
                    target_processing_seconds: Dur::from_secs(5),
                    ..cfg(1, 10)
                },
                obs(Some(12_000), Some(800.0)),
                state(1, None, None),
                3,
                "scaled up from 1 to 3: 12,000 pending at 800/s per replica",
            ),
            (
                "12,000 pending at 800/s over 20s is within one replica",
                cfg(1, 10),
                obs(Some(12_000), Some(800.0)),
                state(1, None, None),
                1,
                "holding at 1: 12,000 pending at 800/s per replica",
            ),
            (
                "12,000 pending at 100/s over 20s wants 6; a step is 2",
                cfg(1, 10),
                obs(Some(12_000), Some(100.0)),
                state(1, long_ago, None),
                3,
                "scaled up from 1 to 3: 12,000 pending at 100/s per replica",
            ),
            (
                "the step reaches what is wanted",
                cfg(1, 10),
                obs(Some(12_000), Some(100.0)),
                state(5, long_ago, None),
                6,
                "scaled up from 5 to 6: 12,000 pending at 100/s per replica",
            ),
            (
                "clamped to max",
                cfg(1, 4),
                obs(Some(1_000_000), Some(100.0)),
                state(3, long_ago, None),
                4,
                "scaled up from 3 to 4: 1,000,000 pending at 100/s per replica",
            ),
            (
                "scale up waits out its cooldown",
                cfg(1, 10),
                obs(Some(12_000), Some(100.0)),
                state(1, Some(T0 - 30 * S), None),
                1,
                "holding at 1 (wants 6): cooling down for 1m more; 12,000 pending at 100/s per replica",
            ),
            (
                "scale down steps by 2 after its cooldown",
                cfg(1, 10),
                obs(Some(100), Some(100.0)),
                state(8, long_ago, None),
                6,
                "scaled down from 8 to 6: 100 pending at 100/s per replica",
            ),
            (
                "a separate scale-down cooldown",
                ScaleConfig {
                    scale_down_cooldown: Dur::from_secs(600),
                    ..cfg(1, 10)
                },
                obs(Some(100), Some(100.0)),
                state(8, Some(T0 - 300 * S), None),
                8,
                "holding at 8 (wants 1): cooling down for 5m more; 100 pending at 100/s per replica",
            ),
            (
                "back-pressure holds scale-up",
                cfg(1, 10),
                full.clone(),
                state(2, long_ago, None),
                2,
                "holding at 2 (wants 6): downstream buffer default.etl.out.0 is full; 12,000 pending at 100/s per replica",
            ),
            (
                "back-pressure does not hold scale-down",
                cfg(1, 10),
                Observation {
                    pending: Some(0),
                    ..full.clone()
                },
                state(4, long_ago, None),
                2,
                "scaled down from 4 to 2: 0 pending at 100/s per replica",
            ),
            (
                "unknown rate holds",
                cfg(1, 10),
                obs(Some(5_000), None),
                state(2, None, None),
                2,
                "holding at 2: no processing rate measured yet",
            ),
            (
                "a zero or broken rate is no rate",
                cfg(1, 10),
                obs(Some(5_000), Some(f64::NAN)),
                state(2, None, None),
                2,
                "holding at 2: no processing rate measured yet",
            ),
            (
                "unknown pending holds",
                cfg(1, 10),
                obs(None, Some(10.0)),
                state(2, None, None),
                2,
                "holding at 2: pending messages not measured yet",
            ),
            (
                "paused never acts",
                cfg(1, 10),
                obs(Some(12_000), Some(100.0)),
                paused,
                3,
                "paused",
            ),
            (
                "a vertex at zero wakes to 1 when messages arrive, ignoring cooldown and rate",
                cfg(0, 10),
                obs(Some(7), None),
                state(0, Some(T0), None),
                1,
                "woken from 0 to 1: 7 pending",
            ),
            (
                "a vertex at zero wakes to min",
                cfg(2, 10),
                obs(Some(7), Some(1.0)),
                state(0, None, None),
                2,
                "woken from 0 to 2: 7 pending",
            ),
            (
                "a vertex at zero below min goes to min with nothing pending",
                cfg(2, 10),
                obs(Some(0), None),
                state(0, None, None),
                2,
                "scaled from 0 to 2 to stay within min 2 and max 10",
            ),
            (
                "min 0: to zero once idle for zero_after",
                cfg(0, 10),
                obs(Some(0), Some(50.0)),
                state(3, long_ago, Some(T0 - 120 * S)),
                0,
                "scaled down from 3 to 0: nothing pending or in flight for 2m",
            ),
            (
                "min 0: messages in flight keep a vertex whose input shows none pending",
                cfg(0, 10),
                Observation {
                    unacked: 2_000,
                    ..obs(Some(0), Some(50.0))
                },
                state(1, long_ago, Some(T0 - 120 * S)),
                1,
                "holding at 1: 0 pending at 50/s per replica",
            ),
            (
                "min 0: not before zero_after",
                cfg(0, 10),
                obs(Some(0), Some(50.0)),
                state(1, long_ago, Some(T0 - 119 * S)),
                1,
                "holding at 1: 0 pending at 50/s per replica",
            ),
            (
                "min 1: never to zero",
                cfg(1, 10),
                obs(Some(0), Some(50.0)),
                state(1, long_ago, Some(T0 - 3600 * S)),
                1,
                "holding at 1: 0 pending at 50/s per replica",
            ),
            (
                "at zero with nothing pending stays",
                cfg(0, 10),
                obs(Some(0), None),
                state(0, long_ago, Some(T0 - 3600 * S)),
                0,
                "at 0: nothing pending",
            ),
            (
                "below a raised min goes straight to min",
                cfg(4, 10),
                obs(Some(0), None),
                state(1, Some(T0), None),
                4,
                "scaled from 1 to 4 to stay within min 4 and max 10",
            ),
            (
                "above a lowered max goes straight to max",
                cfg(1, 2),
                obs(Some(0), None),
                state(6, Some(T0), None),
                2,
                "scaled from 6 to 2 to stay within min 1 and max 2",
            ),
            (
                "max 0 keeps a vertex at zero even with messages pending",
                cfg(0, 0),
                obs(Some(50), Some(10.0)),
                state(0, None, None),
                0,
                "at 0: max is 0",
            ),
            (
                "slow replicas get a decimal rate",
                cfg(1, 10),
                obs(Some(30), Some(0.5)),
                state(1, long_ago, None),
                3,
                "scaled up from 1 to 3: 30 pending at 0.5/s per replica",
            ),
        ];
        for (name, c, o, s, want, reason) in cases {
            let d = decide(&c, &o, &s, T0);
            assert_eq!((d.replicas, d.reason.as_str()), (want, reason), "{name}");
            assert_eq!(d.state.replicas, d.replicas, "{name}");
            if want != s.replicas {
                assert_eq!(d.state.last_scaled_at, Some(T0), "{name}");
            }
        }
    }

    #[test]
    fn idle_time_is_kept_in_the_state_and_reset_by_work() {
        let c = cfg(0, 5);
        let s = state(2, None, None);
        let d = decide(&c, &obs(Some(0), Some(10.0)), &s, T0);
        assert_eq!(d.state.idle_since, Some(T0));
        // Still idle later: the start of the quiet spell is kept, not moved.
        let d = decide(&c, &obs(Some(0), Some(10.0)), &d.state, T0 + 60 * S);
        assert_eq!(d.state.idle_since, Some(T0));
        let d2 = decide(&c, &obs(Some(0), Some(10.0)), &d.state, T0 + 120 * S);
        assert_eq!(d2.replicas, 0);
        // One pending message ends the quiet spell.
        let d = decide(&c, &obs(Some(1), Some(10.0)), &d.state, T0 + 90 * S);
        assert_eq!(d.state.idle_since, None);
    }

    #[test]
    fn counts_read_with_thousands_separators() {
        for (n, want) in [
            (0, "0"),
            (999, "999"),
            (1000, "1,000"),
            (12_000, "12,000"),
            (1_234_567, "1,234,567"),
        ] {
            assert_eq!(thousands(n), want);
        }
    }

    #[test]
    fn scale_settings_are_bounded() {
        let cases = [
            (cfg(3, 2), "scale.min: 3 is more than max 2"),
            (cfg(1, MAX_COUNT + 1), "scale.max: expected at most 100000"),
            (
                ScaleConfig {
                    replicas_per_step: 0,
                    ..cfg(1, 2)
                },
                "scale.replicas_per_step: expected 1 to 100000, got 0",
            ),
            (
                ScaleConfig {
                    target_processing_seconds: Dur::from_millis(500),
                    ..cfg(1, 2)
                },
                "scale.target_processing_seconds: expected at least 1s, got 500ms",
            ),
            (
                ScaleConfig {
                    zero_after: Dur::from_secs(3601),
                    ..cfg(0, 2)
                },
                "scale.zero_after: expected at most 1h, got 1h 1s",
            ),
        ];
        for (c, want) in cases {
            let err = c.validate("scale").unwrap_err();
            assert!(err.starts_with(want), "{err} (wanted {want:?})");
        }
        assert_eq!(cfg(0, 0).validate("scale"), Ok(()));
    }
}
