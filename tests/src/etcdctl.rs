//! Running `etcdctl` (API v3) with a timeout and capturing its output.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Default etcdctl (Debian `etcd-client`).
pub const ETCDCTL_BIN: &str = "/usr/bin/etcdctl";

/// Bound on one etcdctl invocation.
pub const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(30);

/// What a command printed and how it exited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CmdOutput {
    pub stdout: String,
    pub stderr: String,
    /// Exit code; `None` if killed by a signal.
    pub code: Option<i32>,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The `Error: ...` line etcdctl prints on failure (its other stderr lines are
    /// timestamped client logs, which differ between runs).
    pub fn error_line(&self) -> Option<String> {
        self.stderr
            .lines()
            .find(|l| l.starts_with("Error:"))
            .map(|l| l.to_string())
    }
}

pub fn etcdctl_bin() -> PathBuf {
    let p = PathBuf::from(std::env::var("ETCDCTL_BIN").unwrap_or_else(|_| ETCDCTL_BIN.to_string()));
    if !p.is_file() {
        panic!(
            "{} not found: install Debian's etcd-client (scripts/setup does), or set ETCDCTL_BIN",
            p.display()
        );
    }
    p
}

/// Runs `cmd` (stdio captured) with `stdin` fed to it, killing it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, stdin: Option<&str>, timeout: Duration) -> CmdOutput {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
    let feeder = stdin.map(|s| {
        let mut pipe = child.stdin.take().unwrap();
        let s = s.to_string();
        std::thread::spawn(move || {
            let _ = pipe.write_all(s.as_bytes());
        })
    });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => panic!("wait for {cmd:?}: {e}"),
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
    CmdOutput {
        stdout,
        stderr,
        code: status.code(),
    }
}

/// Runs `etcdctl --endpoints=<endpoint> <args>` with ETCDCTL_API=3 and a timeout.
pub fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> CmdOutput {
    let mut cmd = Command::new(etcdctl_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCDCTL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--dial-timeout=5s")
        .arg("--command-timeout=15s")
        .args(args);
    run_with_timeout(cmd, stdin, ETCDCTL_TIMEOUT)
}

/// A long-running etcdctl (`watch`) whose standard input stays open until it is
/// stopped, so interactive mode keeps reading.
pub struct Background {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    out: Option<std::thread::JoinHandle<Vec<u8>>>,
    err: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Background {
    /// Starts `etcdctl --endpoints=<endpoint> <args>` in the background.
    pub fn start(endpoint: &str, args: &[&str]) -> Background {
        let mut cmd = Command::new(etcdctl_bin());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCDCTL_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoint}"))
            .arg("--dial-timeout=5s")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("failed to run {cmd:?}: {e}"));
        let mut out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = out.read_to_end(&mut v);
            v
        });
        let err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = err.read_to_end(&mut v);
            v
        });
        Background {
            stdin: child.stdin.take(),
            child,
            out: Some(out),
            err: Some(err),
        }
    }

    /// Writes a line to its standard input.
    pub fn line(&mut self, line: &str) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = s.write_all(format!("{line}\n").as_bytes());
            let _ = s.flush();
        }
    }

    /// Waits up to `grace` for it to exit by itself, then kills it; returns what it
    /// printed. The exit code is `None` when it had to be killed.
    pub fn stop(mut self, grace: Duration) -> CmdOutput {
        let deadline = Instant::now() + grace;
        let mut status = None;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                status = Some(st);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.stdin.take();
        let stdout = self.out.take().unwrap().join().unwrap();
        let stderr = self.err.take().unwrap().join().unwrap();
        CmdOutput {
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            code: status.and_then(|s| s.code()),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.out.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
