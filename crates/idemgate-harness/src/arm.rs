//! Kill points armed over stdin: the supervisor writes `ARM <point>` (or `DISARM`) to a process,
//! which stops
//! at the next place that reaches that point, says `AT <point>` on stdout, and waits for the
//! supervisor's SIGKILL.

use std::io::{BufRead, Write};
use std::process::ChildStdin;
use std::sync::{Arc, Mutex};

/// The point armed in this process, if any.
#[derive(Debug, Default)]
pub(crate) struct Armed(Mutex<Option<String>>);

impl Armed {
    /// Reads the supervisor's `ARM <point>` lines from stdin, in a thread of its own.
    pub(crate) fn listen() -> Arc<Self> {
        let armed = Arc::new(Armed::default());
        let lines = Arc::clone(&armed);
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if let Some(point) = line.strip_prefix("ARM ") {
                    *lines.lock() = Some(point.to_owned());
                } else if line == "DISARM" {
                    *lines.lock() = None;
                }
            }
        });
        armed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `point` is armed. If so it is disarmed (one stop per arming), and the supervisor
    /// is told `AT <point>`.
    pub(crate) fn stop_at(&self, point: &str) -> bool {
        {
            let mut armed = self.lock();
            if armed.as_deref() != Some(point) {
                return false;
            }
            *armed = None;
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "AT {point}");
        let _ = out.flush();
        true
    }
}

/// Waits for the supervisor's SIGKILL.
pub(crate) fn park() -> ! {
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Arms `point` in the process whose stdin is `stdin`.
pub(crate) fn arm(stdin: &mut ChildStdin, point: &str) -> std::io::Result<()> {
    writeln!(stdin, "ARM {point}")?;
    stdin.flush()
}

/// Disarms the process whose stdin is `stdin`.
pub(crate) fn disarm(stdin: &mut ChildStdin) -> std::io::Result<()> {
    writeln!(stdin, "DISARM")?;
    stdin.flush()
}
