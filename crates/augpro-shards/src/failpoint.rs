//! Fault-injection points for the crash tests.

use std::sync::OnceLock;

/// The fault-injection hook: the `augpro-faulty` test binary installs one; the `augpro`
/// binary never does, so its fault-injection points do nothing.
static FAILPOINT_HOOK: OnceLock<fn(&str)> = OnceLock::new();

/// Installs the hook every fault-injection point calls (once per process; later calls are
/// ignored).
pub fn install_failpoint_hook(hook: fn(&str)) {
    let _ = FAILPOINT_HOOK.set(hook);
}

/// A fault-injection point for the crash tests: calls the installed hook with `point`, or
/// does nothing when none is installed.
#[inline]
pub fn failpoint(point: &str) {
    if let Some(hook) = FAILPOINT_HOOK.get() {
        hook(point);
    }
}
