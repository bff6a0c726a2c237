//! Start-up failures an operator meets in the first minute: each must exit non-zero with one
//! line that says what is wrong and what to do.

use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn ringway() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ringway"));
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Run to completion, but never wait more than 20 s: a gateway that starts serving instead of
/// failing is killed and the test fails on its exit status.
fn run_bounded(mut cmd: Command) -> Output {
    let mut child = cmd.spawn().expect("spawn ringway");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A seccomp filter that makes io_uring_setup fail with `errno`, as Docker's default profile
/// and `kernel.io_uring_disabled=2` do.
fn deny_io_uring(cmd: &mut Command, errno: u32) {
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JMP_JEQ_K: u16 = 0x15;
    const BPF_RET_K: u16 = 0x06;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let nr = libc::SYS_io_uring_setup as u32;
    let filter = [
        libc::sock_filter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        }, // seccomp_data.nr
        libc::sock_filter {
            code: BPF_JMP_JEQ_K,
            jt: 0,
            jf: 1,
            k: nr,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | errno,
        },
        libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    // SAFETY: the closure runs in the forked child before exec and only makes two prctl calls
    // (async-signal-safe) on a filter array that the fork copied into the child's memory.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut _,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const _,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn io_uring_denied_by_seccomp_is_one_clear_line_and_exit_1() {
    for errno in [libc::EPERM as u32, libc::ENOSYS as u32] {
        let mut cmd = ringway();
        cmd.args(["--listen", "127.0.0.1:0"]);
        deny_io_uring(&mut cmd, errno);
        let out = run_bounded(cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "errno {errno}: {stderr}");
        assert!(
            stderr.contains("io_uring is unavailable"),
            "errno {errno}: {stderr}"
        );
        assert!(
            stderr.contains("kernel.io_uring_disabled"),
            "says how to enable it: {stderr}"
        );
        assert!(stderr.contains("seccomp"), "mentions containers: {stderr}");
    }
}

#[test]
fn address_in_use_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut cmd = ringway();
    cmd.args(["--listen", &addr]);
    let out = run_bounded(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}

#[test]
fn bad_config_names_key_file_and_line() {
    let path = std::env::temp_dir().join(format!("ringway-startup-{}.toml", std::process::id()));
    std::fs::write(&path, "workers = 1\nmax_mesage_bytes = 10\n").unwrap();
    let mut cmd = ringway();
    cmd.arg("--config").arg(&path);
    let out = run_bounded(cmd);
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("max_mesage_bytes"), "{stderr}");
    assert!(stderr.contains(&path.display().to_string()), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
}

#[test]
fn zero_workers_is_refused() {
    let mut cmd = ringway();
    cmd.args(["--listen", "127.0.0.1:0", "--workers", "0"]);
    let out = run_bounded(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--workers must be at least 1"), "{stderr}");
}

#[test]
fn check_config_accepts_good_files_and_names_what_is_wrong_in_bad_ones() {
    let dir = std::env::temp_dir();
    let good = dir.join(format!("ringway-check-good-{}.toml", std::process::id()));
    let bad = dir.join(format!("ringway-check-bad-{}.toml", std::process::id()));
    std::fs::write(&good, "workers = 2\n[[routes]]\npath = \"/chat\"\n").unwrap();
    std::fs::write(&bad, "[[routes]]\npath = \"/x\"\nupstream = \"nope\"\n").unwrap();
    let mut cmd = ringway();
    cmd.arg("check-config").arg(&good);
    let out = run_bounded(cmd);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = ringway();
    cmd.arg("check-config").arg(&bad);
    let out = run_bounded(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = (std::fs::remove_file(&good), std::fs::remove_file(&bad));
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("routes[0].upstream") && stderr.contains("nope"),
        "{stderr}"
    );
}
