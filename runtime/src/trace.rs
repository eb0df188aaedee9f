//! Chrome traces (chrome://tracing, ui.perfetto.dev) of training steps: one
//! track per rank and one per rank's communication stream (where the
//! gradient buckets' collectives run beside the backward pass), with a span
//! per phase of its lowered program
//! (forward and backward passes, gradient reduction, the optimizer update)
//! and within them the collectives (named by op and mesh axis) and
//! point-to-point transfers, so pipeline bubbles and waits on collectives show.

use std::sync::Mutex;
use std::time::Instant;

struct Event {
    name: String,
    cat: &'static str,
    rank: usize,
    /// On the rank's communication stream (its second track), not its compute stream.
    comm: bool,
    ts_us: f64,
    dur_us: f64,
}

/// Spans recorded during the first `steps` training steps.
pub struct Trace {
    origin: Instant,
    events: Mutex<Vec<Event>>,
    /// Steps recorded (later steps run untraced, keeping files small).
    pub steps: u64,
}

impl Trace {
    pub fn new(steps: u64) -> Trace {
        Trace { origin: Instant::now(), events: Mutex::new(Vec::new()), steps }
    }

    /// Run `f`, recording it as a span on `rank`'s track.
    pub fn span<R>(&self, rank: usize, cat: &'static str, name: impl Into<String>, f: impl FnOnce() -> R) -> R {
        let t0 = Instant::now();
        let r = f();
        self.record(rank, cat, name, t0);
        r
    }

    /// Record a span on `rank`'s compute track from `t0` until now.
    pub fn record(&self, rank: usize, cat: &'static str, name: impl Into<String>, t0: Instant) {
        self.record_on(rank, false, cat, name, t0)
    }

    /// Record a span from `t0` until now on `rank`'s communication-stream
    /// track (`comm`) or its compute track.
    pub fn record_on(&self, rank: usize, comm: bool, cat: &'static str, name: impl Into<String>, t0: Instant) {
        let ts_us = (t0 - self.origin).as_secs_f64() * 1e6;
        let dur_us = t0.elapsed().as_secs_f64() * 1e6;
        let e = Event { name: name.into(), cat, rank, comm, ts_us, dur_us };
        self.events.lock().unwrap_or_else(|e| e.into_inner()).push(e);
    }

    /// The trace in Chrome's JSON format; `names[r]` labels rank r's
    /// compute track (thread id r), and its communication stream's track
    /// (thread id `names.len() + r`) where it has one.
    pub fn to_json(&self, names: &[String]) -> serde_json::Value {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let track = |r: usize, n: String| serde_json::json!({"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": n}});
        let mut out: Vec<serde_json::Value> = names.iter().enumerate().map(|(r, n)| track(r, n.clone())).collect();
        for (r, n) in names.iter().enumerate() {
            if events.iter().any(|e| e.rank == r && e.comm) {
                out.push(track(names.len() + r, format!("{n}: communication stream")));
            }
        }
        out.extend(events.iter().map(|e| {
            let tid = if e.comm { names.len() + e.rank } else { e.rank };
            serde_json::json!({
                "name": e.name, "cat": e.cat, "ph": "X", "pid": 0, "tid": tid,
                "ts": (e.ts_us * 1000.0).round() / 1000.0, "dur": (e.dur_us * 1000.0).round() / 1000.0,
            })
        }));
        serde_json::json!({ "traceEvents": out, "displayTimeUnit": "ms" })
    }

    /// Write the trace to `path` (atomically).
    pub fn write(&self, path: &std::path::Path, names: &[String]) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&self.to_json(names)).unwrap_or_default())?;
        std::fs::rename(&tmp, path)
    }
}
