//! The process runtime's hold on its processes beyond its own children.
//!
//! A container's process is a child of edgecore and dies with it (`PR_SET_PDEATHSIG`), but
//! what that process forked does not: after `kill -9` of edgecore it lives on under init, and
//! the next edgecore would start the pod beside it. So every process of a pod carries two
//! marker variables in its environment (inherited by everything it forks), this data dir's
//! runtime id and the pod's uid, and each container's process group is recorded on disk next
//! to its log. When edgecore starts, [`sweep`] kills whatever a previous run left.
//!
//! A process is killed only when it is provably ours: its environment holds this data dir's
//! runtime id (another data dir, another edgecore, or an unrelated process with a recycled
//! pid does not), or it is in the group of a recorded leader that is still the very process
//! recorded (same boot, same pid, same start time; a group id is not reused while its leader
//! lives).

use std::path::Path;
use std::time::{Duration, Instant};

/// The environment variable that names the data dir's process runtime.
pub const RUNTIME_ID_VAR: &str = "KEDGE_RUNTIME_ID";
/// The environment variable that carries the pod's uid.
pub const POD_UID_VAR: &str = "KEDGE_POD_UID";
/// The file name suffix of a container's process group record.
pub const RECORD_SUFFIX: &str = ".pgroup";

/// What `/proc/<pid>/stat` says that matters here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `Z`, ...
    pub state: char,
    /// The process group.
    pub pgid: i32,
    /// Start time in clock ticks after boot: with the pid, names one process within a boot.
    pub start: u64,
}

/// Parses `/proc/<pid>/stat`. The command name may hold spaces and parentheses, so fields
/// are counted after the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of proc(5), pgrp field 5, starttime field 22.
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgid: fields.get(2)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

/// The stat of a live process, `None` if there is no such process.
pub fn stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether a process exists and is not a zombie.
pub fn running(pid: i32) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z')
}

/// Whether a NUL-separated environment block holds every one of `entries` (`NAME=value`),
/// each as a whole entry.
pub fn environ_has(block: &[u8], entries: &[String]) -> bool {
    entries
        .iter()
        .all(|want| block.split(|b| *b == 0).any(|e| e == want.as_bytes()))
}

/// The marker entries of a data dir's runtime and, if given, of one pod.
pub fn markers(runtime_id: &str, pod_uid: Option<&str>) -> Vec<String> {
    let mut entries = vec![format!("{RUNTIME_ID_VAR}={runtime_id}")];
    if let Some(uid) = pod_uid {
        entries.push(format!("{POD_UID_VAR}={uid}"));
    }
    entries
}

/// Live processes (not zombies, not this one) whose environment holds all of `entries`.
pub fn marked(entries: &[String]) -> Vec<i32> {
    let own = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != own)
        .filter(|pid| {
            // Unreadable (gone, or not ours to read): not ours to kill either.
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|block| environ_has(&block, entries))
        })
        .filter(|pid| running(*pid))
        .collect()
}

/// This boot's id (records from an earlier boot name processes that are long gone).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// A container's process group, as recorded on disk while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRecord {
    pub boot: String,
    /// The group's id, which is its leader's pid.
    pub pgid: i32,
    /// The leader's start time.
    pub start: u64,
}

impl GroupRecord {
    /// The record of the group `pid` leads, read from `/proc` now.
    pub fn of(pid: i32) -> Option<Self> {
        Some(GroupRecord {
            boot: boot_id(),
            pgid: pid,
            start: stat(pid)?.start,
        })
    }

    pub fn encode(&self) -> String {
        format!("{} {} {}\n", self.boot, self.pgid, self.start)
    }

    pub fn decode(text: &str) -> Option<Self> {
        let mut fields = text.split_whitespace();
        let record = GroupRecord {
            boot: fields.next()?.to_owned(),
            pgid: fields.next()?.parse().ok()?,
            start: fields.next()?.parse().ok()?,
        };
        (record.pgid > 1 && fields.next().is_none()).then_some(record)
    }

    /// Whether the recorded leader is still the same live process, given this boot's id.
    pub fn leader_alive(&self, boot: &str) -> bool {
        self.boot == boot
            && stat(self.pgid).is_some_and(|s| s.state != 'Z' && s.start == self.start)
    }
}

/// Sends `signal` to every process of group `pgid`.
pub fn signal_group(pgid: i32, signal: i32) {
    if pgid > 1 {
        // SAFETY: plain syscall; a negative pid addresses the process group.
        unsafe { libc::kill(-pgid, signal) };
    }
}

/// Whether no process is left in group `pgid`.
pub fn group_empty(pgid: i32) -> bool {
    // SAFETY: plain syscall; signal 0 only checks that the group exists.
    pgid <= 1 || unsafe { libc::kill(-pgid, 0) } != 0
}

fn kill_pid(pid: i32) {
    if pid > 1 {
        // SAFETY: plain syscall on a pid just verified to be ours.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Kills (SIGKILL) the processes marked with `entries`; returns their pids.
pub fn kill_marked(entries: &[String]) -> Vec<i32> {
    let pids = marked(entries);
    for pid in &pids {
        kill_pid(*pid);
    }
    pids
}

/// The group records under the pod directories of `pods_dir`.
fn records(pods_dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(pods) = std::fs::read_dir(pods_dir) else {
        return Vec::new();
    };
    pods.flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| std::fs::read_dir(e.path()).ok())
        .flat_map(|files| files.flatten().map(|f| f.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(RECORD_SUFFIX))
        })
        .collect()
}

/// Kills whatever an earlier edgecore on this data dir left running: the groups recorded
/// under `pods_dir` whose leader is still the recorded process, and every process marked
/// with `runtime_id`; removes the records; waits at most `wait` for the processes to be
/// gone. Returns how many processes were signalled.
pub fn sweep(pods_dir: &Path, runtime_id: &str, wait: Duration) -> usize {
    let boot = boot_id();
    let mut killed: Vec<i32> = Vec::new();
    for path in records(pods_dir) {
        let record = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| GroupRecord::decode(&t));
        if let Some(record) = record.filter(|r| r.leader_alive(&boot)) {
            tracing::warn!(pgid = record.pgid, record = %path.display(),
                "killing a process group an earlier edgecore left running");
            signal_group(record.pgid, libc::SIGKILL);
            killed.push(record.pgid);
        }
        let _ = std::fs::remove_file(&path);
    }
    let marked = kill_marked(&markers(runtime_id, None));
    if !marked.is_empty() {
        tracing::warn!(count = marked.len(), pids = ?marked,
            "killed processes an earlier edgecore left running");
    }
    killed.extend(marked);
    let deadline = Instant::now() + wait;
    while killed.iter().any(|pid| running(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    killed.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_come_after_the_last_parenthesis() {
        let mut text = String::from("4242 (a) b) c) S 1 4240 4240 0 -1 4194560");
        // Fields 10..=21, then starttime (22) and more.
        for n in 10..=21 {
            text.push_str(&format!(" {n}"));
        }
        text.push_str(" 987654 1234 5678\n");
        assert_eq!(
            parse_stat(&text),
            Some(Stat {
                state: 'S',
                pgid: 4240,
                start: 987654
            })
        );
        assert_eq!(parse_stat("12 (x) S 1"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn own_stat_is_read() {
        let own = stat(std::process::id() as i32).expect("own stat");
        assert_ne!(own.state, 'Z');
        assert!(running(std::process::id() as i32));
    }

    #[test]
    fn environ_entries_match_whole() {
        let block = b"PATH=/bin\0KEDGE_RUNTIME_ID=abc\0KEDGE_POD_UID=u-1\0";
        assert!(environ_has(block, &markers("abc", None)));
        assert!(environ_has(block, &markers("abc", Some("u-1"))));
        assert!(!environ_has(block, &markers("ab", None)));
        assert!(!environ_has(block, &markers("abcd", None)));
        assert!(!environ_has(block, &markers("abc", Some("u-2"))));
        assert!(!environ_has(b"", &markers("abc", None)));
    }

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let record = GroupRecord {
            boot: "b-1".into(),
            pgid: 77,
            start: 123,
        };
        assert_eq!(GroupRecord::decode(&record.encode()), Some(record));
        assert_eq!(GroupRecord::decode("b 1 5"), None, "never init's group");
        assert_eq!(GroupRecord::decode("b x 5"), None);
        assert_eq!(GroupRecord::decode("b 7 5 extra"), None);
        assert_eq!(GroupRecord::decode(""), None);
    }

    #[test]
    fn a_record_names_one_process_of_one_boot() {
        let own = std::process::id() as i32;
        let record = GroupRecord::of(own).expect("own record");
        let boot = boot_id();
        assert!(record.leader_alive(&boot));
        let other_boot = GroupRecord {
            boot: format!("{boot}-earlier"),
            ..record.clone()
        };
        assert!(!other_boot.leader_alive(&boot));
        let recycled = GroupRecord {
            start: record.start + 1,
            ..record
        };
        assert!(!recycled.leader_alive(&boot));
    }

    #[test]
    fn the_sweep_kills_marked_processes_and_spares_others() {
        let dir = tempfile::tempdir().unwrap();
        let id = format!("unit-{}", std::process::id());
        let spawn = |runtime: &str| {
            std::process::Command::new("sleep")
                .arg("30")
                .env(RUNTIME_ID_VAR, runtime)
                .spawn()
                .unwrap()
        };
        let mut ours = spawn(&id);
        let mut theirs = spawn(&format!("{id}-other"));
        // Until `sleep` has exec'd, /proc shows the test's own environment, not the marker.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while marked(&markers(&id, None)).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(marked(&markers(&id, None)), vec![ours.id() as i32]);
        // A record of a group that is no longer what it was is removed, not acted on.
        let pod = dir.path().join("default_p");
        std::fs::create_dir_all(&pod).unwrap();
        let stale = GroupRecord {
            boot: "an-earlier-boot".into(),
            pgid: theirs.id() as i32,
            start: 1,
        };
        std::fs::write(pod.join(format!("main{RECORD_SUFFIX}")), stale.encode()).unwrap();
        assert_eq!(sweep(dir.path(), &id, Duration::from_secs(5)), 1);
        assert!(ours.wait().unwrap().code().is_none(), "killed by a signal");
        assert!(
            theirs.try_wait().unwrap().is_none(),
            "another runtime's process lives"
        );
        assert!(!pod.join(format!("main{RECORD_SUFFIX}")).exists());
        let _ = theirs.kill();
        let _ = theirs.wait();
    }
}
