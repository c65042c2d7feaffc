//! Stage and method timings from `tracing` spans. Code marks a stretch of work with
//! [`stage`] or [`method`]; [`SpanTimes`], a layer of the binary's subscriber, adds up the
//! wall time of those spans, and [`take`] drains the totals (one shard's `timings.json`).
//! Without the layer (the library used on its own) the totals stay empty.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;
use tracing::span::{Attributes, EnteredSpan, Id};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Seconds per stage and per method since the last [`take`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// Pipeline stages: `teacher`, `projection`, `decode`, `tokenize`, `write`; in
    /// `train-student`: `setup`, `data`, `step`, `dev`, `validation`, `checkpoint`.
    pub stages: BTreeMap<String, f64>,
    /// Augmentation methods (teacher time included).
    pub methods: BTreeMap<String, f64>,
}

static TOTALS: Mutex<Option<Totals>> = Mutex::new(None);

/// Times a pipeline stage until the guard is dropped.
pub fn stage(name: &str) -> EnteredSpan {
    tracing::info_span!("stage", name).entered()
}

/// Times an augmentation method until the guard is dropped.
pub fn method(name: &str) -> EnteredSpan {
    tracing::info_span!("method", name).entered()
}

/// The totals so far, which start again from zero.
pub fn take() -> Totals {
    TOTALS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default()
}

/// The layer that adds up the time of [`stage`] and [`method`] spans.
pub struct SpanTimes;

/// What a timed span carries from creation to close.
struct Timed {
    method: bool,
    name: String,
    start: Instant,
}

struct NameField(Option<String>);

impl tracing::field::Visit for NameField {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "name" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "name" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for SpanTimes {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let kind = attrs.metadata().name();
        if kind != "stage" && kind != "method" {
            return;
        }
        let mut name = NameField(None);
        attrs.record(&mut name);
        if let (Some(span), Some(name)) = (ctx.span(id), name.0) {
            span.extensions_mut().insert(Timed {
                method: kind == "method",
                name,
                start: Instant::now(),
            });
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        let ext = span.extensions();
        let Some(t) = ext.get::<Timed>() else { return };
        let secs = t.start.elapsed().as_secs_f64();
        let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
        let totals = totals.get_or_insert_with(Totals::default);
        let map = if t.method {
            &mut totals.methods
        } else {
            &mut totals.stages
        };
        *map.entry(t.name.clone()).or_default() += secs;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    #[test]
    fn spans_add_up_per_stage_and_method() {
        let sub = tracing_subscriber::registry().with(SpanTimes);
        tracing::subscriber::with_default(sub, || {
            take();
            {
                let _m = method("augpro_mix");
                let _s = stage("projection");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            drop(stage("projection"));
            let t = take();
            assert!(t.methods["augpro_mix"] >= 0.02, "{t:?}");
            assert!(t.stages["projection"] >= 0.02, "{t:?}");
            assert_eq!(t.stages.len(), 1);
            assert_eq!(take(), Totals::default());
        });
    }
}
