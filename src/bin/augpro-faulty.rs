//! `augpro-faulty`: the `augpro` command with fault-injection points, for the crash tests
//! only (built with the `failpoints` feature; the `augpro` binary has none).
//!
//! `AUGPRO_FAILPOINT` is a comma-separated list of points. A plain `point` kills the
//! process with SIGKILL there, exactly as an external `kill -9` would. `point:hold` stops
//! there until the file named by `AUGPRO_FAILPOINT_RELEASE` exists, after creating that
//! name plus `.held` to say it has arrived (for races between processes).

use std::path::PathBuf;
use std::time::{Duration, Instant};

fn main() {
    augpro::util::install_failpoint_hook(failpoint);
    augpro::cli::main();
}

fn failpoint(point: &str) {
    let Ok(spec) = std::env::var("AUGPRO_FAILPOINT") else {
        return;
    };
    for p in spec.split(',').map(str::trim) {
        if p == point {
            eprintln!("failpoint {point}: SIGKILL");
            // SAFETY: raising a signal on the current process has no preconditions.
            unsafe {
                libc::raise(libc::SIGKILL);
            }
        } else if p.strip_suffix(":hold") == Some(point) {
            hold(point);
        }
    }
}

/// Waits (at most ten minutes) for the release file, after announcing arrival.
fn hold(point: &str) {
    let release = PathBuf::from(
        std::env::var_os("AUGPRO_FAILPOINT_RELEASE")
            .expect("AUGPRO_FAILPOINT_RELEASE names the file that releases a held point"),
    );
    let mut held = release.clone().into_os_string();
    held.push(".held");
    std::fs::write(&held, point).expect("announce the held failpoint");
    eprintln!("failpoint {point}: held");
    let t0 = Instant::now();
    while !release.exists() && t0.elapsed() < Duration::from_secs(600) {
        std::thread::sleep(Duration::from_millis(20));
    }
}
