//! Container logs: written in the CRI log format, read for `kubectl logs`.
//!
//! On disk each container has `DATA_DIR/pods/<namespace>_<name>/<container>.log`, and the log
//! of its previous instance (before its last restart) in `<container>.previous.log`. Lines are
//! in the format kubelet reads from CRI runtimes (containerd's `cri/pkg/...` log format):
//! `<RFC 3339 UTC time with nanoseconds> <stdout|stderr> <F|P> <content>\n`, where `P` marks a
//! part of a line longer than [`MAX_LINE`] and `F` its last (or only) part. The time is what
//! `kubectl logs --timestamps`, `--since` and `--since-time` use.
//!
//! [`LogOptions`] are the query parameters of kube-apiserver's `pods/{name}/log` subresource
//! (`PodLogOptions`); [`read`] answers them from the files, and [`follow`] keeps answering while
//! the container runs (`-f`).

use std::io::{BufRead, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;

/// Lines longer than this are written in parts (`P` … `F`), as containerd does (16 KiB).
pub const MAX_LINE: usize = 16 * 1024;

/// How often a followed log looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// The query of a `GET .../pods/{name}/log` (Kubernetes' `PodLogOptions`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// The container; may be empty only for a pod with one container.
    pub container: String,
    /// Keep the response open and send new lines until the container stops (`-f`).
    pub follow: bool,
    /// The log of the container's previous instance (`-p`).
    pub previous: bool,
    /// Prefix each line with its RFC 3339 time (`--timestamps`).
    pub timestamps: bool,
    /// Only the last this many lines (`--tail`).
    pub tail_lines: Option<u64>,
    /// Only lines written in the last this many seconds (`--since`).
    pub since_seconds: Option<i64>,
    /// Only lines written at or after this Unix time in seconds (`--since-time`, RFC 3339 in
    /// the query).
    pub since_time: Option<i64>,
    /// Stop after this many bytes of output (`--limit-bytes`).
    pub limit_bytes: Option<u64>,
}

impl LogOptions {
    /// Parses the query string of the `log` subresource. Errors name the bad parameter, as
    /// kube-apiserver's 400 does.
    pub fn from_query(query: &str) -> Result<LogOptions, String> {
        let mut options = LogOptions::default();
        for (name, value) in query_pairs(query)? {
            let number = |what: &str| -> Result<i64, String> {
                value
                    .parse::<i64>()
                    .map_err(|_| format!("{what}: {value:?} is not an integer"))
            };
            let flag = |what: &str| -> Result<bool, String> {
                match value.as_str() {
                    "" | "true" | "1" => Ok(true),
                    "false" | "0" => Ok(false),
                    other => Err(format!("{what}: {other:?} is not a boolean")),
                }
            };
            match name.as_str() {
                "container" => options.container = value.clone(),
                "follow" => options.follow = flag("follow")?,
                "previous" => options.previous = flag("previous")?,
                "timestamps" => options.timestamps = flag("timestamps")?,
                "tailLines" => {
                    let n = number("tailLines")?;
                    if n < 0 {
                        return Err("tailLines: must be greater than or equal to 0".into());
                    }
                    options.tail_lines = Some(n as u64);
                }
                "sinceSeconds" => {
                    let n = number("sinceSeconds")?;
                    if n < 1 {
                        return Err("sinceSeconds: must be greater than 0".into());
                    }
                    options.since_seconds = Some(n);
                }
                "sinceTime" => {
                    options.since_time = Some(
                        replication::api::object::parse_rfc3339(&value)
                            .ok_or_else(|| format!("sinceTime: {value:?} is not RFC 3339"))?,
                    )
                }
                "limitBytes" => {
                    let n = number("limitBytes")?;
                    if n < 1 {
                        return Err("limitBytes: must be greater than 0".into());
                    }
                    options.limit_bytes = Some(n as u64);
                }
                // Like kube-apiserver's query decoding: other parameters (kubectl's `timeout`,
                // `pretty`, `insecureSkipTLSVerifyBackend`, …) change nothing here.
                _ => {}
            }
        }
        if options.since_seconds.is_some() && options.since_time.is_some() {
            return Err("at most one of sinceTime or sinceSeconds may be specified".into());
        }
        Ok(options)
    }

    /// The query string that [`LogOptions::from_query`] reads back.
    pub fn to_query(&self) -> String {
        let mut parts = vec![format!("container={}", self.container)];
        if self.follow {
            parts.push("follow=true".into());
        }
        if self.previous {
            parts.push("previous=true".into());
        }
        if self.timestamps {
            parts.push("timestamps=true".into());
        }
        if let Some(n) = self.tail_lines {
            parts.push(format!("tailLines={n}"));
        }
        if let Some(n) = self.since_seconds {
            parts.push(format!("sinceSeconds={n}"));
        }
        if let Some(t) = self.since_time {
            if let Ok(t) = time::OffsetDateTime::from_unix_timestamp(t) {
                parts.push(format!(
                    "sinceTime={}",
                    replication::api::object::rfc3339(t)
                ));
            }
        }
        if let Some(n) = self.limit_bytes {
            parts.push(format!("limitBytes={n}"));
        }
        parts.join("&")
    }

    /// The earliest line time wanted (Unix seconds), if any, given the time now.
    fn since(&self, now: i64) -> Option<i64> {
        self.since_time
            .or(self.since_seconds.map(|s| now.saturating_sub(s)))
    }
}

/// The `name=value` pairs of a query string, decoded (`%XX`, `+`), repeats kept in order.
pub(crate) fn query_pairs(query: &str) -> Result<Vec<(String, String)>, String> {
    serde_urlencoded::from_str(query).map_err(|e| format!("the query is malformed: {e}"))
}

/// The log file of `container` in the pod directory `pod_dir`.
pub fn path(pod_dir: &Path, container: &str, previous: bool) -> PathBuf {
    if previous {
        pod_dir.join(format!("{container}.previous.log"))
    } else {
        pod_dir.join(format!("{container}.log"))
    }
}

/// `<container>.previous.log` beside `<container>.log`.
fn path_previous(current: &Path) -> PathBuf {
    let stem = current.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    current.with_file_name(format!("{stem}.previous.log"))
}

/// Before a container starts again: its current log (`<container>.log`) becomes the previous
/// instance's (`<container>.previous.log`).
pub fn rotate(current: &Path) {
    let Some(stem) = current.file_stem().and_then(|s| s.to_str()) else {
        return;
    };
    let previous = current.with_file_name(format!("{stem}.previous.log"));
    if std::fs::metadata(current).is_ok_and(|m| m.len() > 0) {
        if let Err(e) = std::fs::rename(current, previous) {
            tracing::warn!(path = %current.display(), error = %e, "cannot keep the previous log");
        }
    }
}

/// When a container's log is rotated by size (kubelet's `--container-log-max-size`, 10Mi, and
/// `--container-log-max-files`, 5, the current file included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRotation {
    /// Bytes past which `<container>.log` is rotated.
    pub max_size: u64,
    /// Files kept per container, the current one included (at least 2).
    pub max_files: usize,
}

impl Default for LogRotation {
    fn default() -> Self {
        LogRotation {
            max_size: 10 << 20,
            max_files: 5,
        }
    }
}

/// If `current` (`<container>.log`) is larger than `rotation.max_size`, renames it to
/// `<container>.log.<UTC time>` (kubelet's rotated name, `20060102-150405` with microseconds so
/// that two rotations in a second do not collide) and deletes the oldest rotated files beyond
/// `max_files - 1`. The writer starts a new file ([`copy_to_log`] notices; a CRI runtime is
/// told with `ReopenContainerLog`). Returns whether it rotated.
///
/// # Errors
/// The rename or a deletion failing (a missing log is not an error: nothing to rotate).
pub fn rotate_if_large(current: &Path, rotation: &LogRotation) -> std::io::Result<bool> {
    match std::fs::metadata(current) {
        Ok(m) if m.len() > rotation.max_size => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    let now = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}.{:06}",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    );
    let Some(name) = current.file_name().and_then(|n| n.to_str()) else {
        return Ok(false);
    };
    std::fs::rename(current, current.with_file_name(format!("{name}.{stamp}")))?;
    let dir = current.parent().unwrap_or(Path::new("."));
    let prefix = format!("{name}.");
    let mut rotated: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    // The stamps sort as text in time order.
    rotated.sort();
    let keep = rotation.max_files.max(2) - 1;
    let excess = rotated.len().saturating_sub(keep);
    for old in &rotated[..excess] {
        std::fs::remove_file(dir.join(old))?;
    }
    Ok(true)
}

/// Now as the CRI log format writes it: RFC 3339 UTC with nanoseconds.
fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{}.{:09}Z",
        replication::api::object::rfc3339(now).trim_end_matches('Z'),
        now.nanosecond()
    )
}

/// Copies a container's stdout or stderr (`stream` names it) into its log file in the CRI
/// format until the pipe closes. Each line is one `write` on a file opened for appending, so
/// the lines of stdout and stderr interleave whole.
pub async fn copy_to_log(
    mut pipe: impl tokio::io::AsyncRead + Unpin,
    file: PathBuf,
    stream: &'static str,
) {
    use std::io::Write;
    let mut log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
    {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %file.display(), error = %e, "cannot open the container log");
            // Drain the pipe so that the container never blocks on a full pipe.
            let _ = tokio::io::copy(&mut pipe, &mut tokio::io::sink()).await;
            return;
        }
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 8 * 1024];
    // After a rotation ([`rotate_if_large`]) the path names a new file: looked at once a
    // second, not per line.
    let mut checked = std::time::Instant::now();
    let mut write = |tag: char, content: &[u8]| {
        if checked.elapsed() >= Duration::from_secs(1) {
            checked = std::time::Instant::now();
            if !same_file(&log, &file) {
                if let Ok(f) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&file)
                {
                    log = f;
                }
            }
        }
        let mut line = Vec::with_capacity(content.len() + 48);
        line.extend_from_slice(timestamp().as_bytes());
        line.push(b' ');
        line.extend_from_slice(stream.as_bytes());
        line.push(b' ');
        line.push(tag as u8);
        line.push(b' ');
        line.extend_from_slice(content);
        line.push(b'\n');
        // A full disk loses log lines, never the container: it keeps running.
        let _ = log.write_all(&line);
    };
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let mut start = 0;
            while end - start > MAX_LINE {
                write('P', &pending[start..start + MAX_LINE]);
                start += MAX_LINE;
            }
            write('F', &pending[start..end]);
            pending.drain(..=end);
        }
        // A line still without its end: its first parts go out now, bounding the buffer.
        while pending.len() > MAX_LINE {
            write('P', &pending[..MAX_LINE]);
            pending.drain(..MAX_LINE);
        }
    }
    if !pending.is_empty() {
        write('F', &pending);
    }
}

/// Whether `path` still names the open file `file` (same device and inode).
fn same_file(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

/// One line of a CRI log: its time (Unix seconds), whether it is the last part of a line, and
/// the raw line with its timestamp (for `--timestamps`) and the content.
struct Entry<'a> {
    unix: i64,
    full: bool,
    timestamp: &'a str,
    content: &'a [u8],
}

fn parse(line: &[u8]) -> Option<Entry<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let timestamp = std::str::from_utf8(parts.next()?).ok()?;
    let _stream = parts.next()?;
    let tag = parts.next()?;
    let content = parts.next().unwrap_or_default();
    Some(Entry {
        unix: replication::api::object::parse_rfc3339(timestamp)?,
        full: tag != b"P",
        timestamp,
        content,
    })
}

/// Formats whole lines of `lines` (CRI log lines, without their newlines) as `kubectl logs`
/// shows them, given `options`; `since` filters by time. A part line (`P`) is joined with the
/// parts after it.
fn render(lines: &[Vec<u8>], options: &LogOptions, since: Option<i64>, out: &mut Vec<u8>) {
    let mut joined: Vec<u8> = Vec::new();
    let mut first_stamp: Option<String> = None;
    let mut first_unix = 0;
    for raw in lines {
        let Some(entry) = parse(raw) else { continue };
        if first_stamp.is_none() {
            first_stamp = Some(entry.timestamp.to_owned());
            first_unix = entry.unix;
        }
        joined.extend_from_slice(entry.content);
        if !entry.full {
            continue;
        }
        let stamp = first_stamp.take().unwrap_or_default();
        if since.is_none_or(|s| first_unix >= s) {
            if options.timestamps {
                out.extend_from_slice(stamp.as_bytes());
                out.push(b' ');
            }
            out.extend_from_slice(&joined);
            out.push(b'\n');
        }
        joined.clear();
    }
}

/// Splits complete lines off `buf` (CRI lines end with `\n`), leaving a trailing partial one.
fn take_lines(buf: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    while let Some(end) = buf.iter().position(|b| *b == b'\n') {
        lines.push(buf[..end].to_vec());
        buf.drain(..=end);
    }
    lines
}

/// Whole CRI lines of a log, the last `tail` of them if set: (lines, the file offset after
/// the last complete line). A missing file is an empty log.
fn read_lines(file: &Path, tail: Option<u64>) -> std::io::Result<(Vec<Vec<u8>>, u64)> {
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let mut reader = std::io::BufReader::new(f);
    let mut lines: std::collections::VecDeque<Vec<u8>> = std::collections::VecDeque::new();
    let mut offset = 0u64;
    let mut full_lines_of_tail = 0u64;
    loop {
        let mut line = Vec::new();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        offset += n as u64;
        line.pop();
        let full = parse(&line).is_some_and(|e| e.full);
        lines.push_back(line);
        if full {
            full_lines_of_tail += 1;
        }
        // Keep only what the tail needs (whole lines: a P part stays with its F).
        if let Some(tail) = tail {
            while full_lines_of_tail > tail {
                let Some(front) = lines.pop_front() else {
                    break;
                };
                if parse(&front).is_some_and(|e| e.full) {
                    full_lines_of_tail -= 1;
                }
            }
        }
    }
    Ok((lines.into(), offset))
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The log as `kubectl logs` without `-f` shows it, within `limit_bytes`.
pub fn read(file: &Path, options: &LogOptions) -> std::io::Result<Vec<u8>> {
    let (lines, _) = read_lines(file, options.tail_lines)?;
    let mut out = Vec::new();
    render(&lines, options, options.since(unix_now()), &mut out);
    if let Some(limit) = options.limit_bytes {
        out.truncate(limit as usize);
    }
    Ok(out)
}

/// Where log bytes go: an HTTP body, a link's response stream, a test's buffer.
pub trait LogSink: Send {
    /// Sends one piece; `false` once the reader is gone (the producer stops then).
    fn send(&mut self, bytes: Vec<u8>) -> impl std::future::Future<Output = bool> + Send;
}

impl LogSink for Vec<u8> {
    async fn send(&mut self, bytes: Vec<u8>) -> bool {
        self.extend_from_slice(&bytes);
        true
    }
}

/// A followed log (`kubectl logs -f`): sends what [`read`] would, then new lines as they are
/// written, into `sink`, until `running` says the container stopped and everything written is
/// sent, the reader is gone, or `limit_bytes` is reached. Polls the file every 200 ms (a quiet
/// log costs one `stat` per poll).
pub async fn follow(
    file: &Path,
    options: &LogOptions,
    mut running: impl FnMut() -> bool + Send,
    sink: &mut impl LogSink,
) -> std::io::Result<()> {
    let (lines, mut offset) = read_lines(file, options.tail_lines)?;
    let since = options.since(unix_now());
    let mut budget = options.limit_bytes.unwrap_or(u64::MAX);
    let mut out = Vec::new();
    render(&lines, options, since, &mut out);
    let mut pending = Vec::new();
    let mut current = std::fs::File::open(file).ok();
    loop {
        if !out.is_empty() {
            out.truncate(budget.min(out.len() as u64) as usize);
            budget -= out.len() as u64;
            if !sink.send(std::mem::take(&mut out)).await || budget == 0 {
                return Ok(());
            }
        }
        let still_running = running();
        // New bytes since `offset`, from the file as it was opened: a rotation renames it,
        // and what was written before the rename is still read from it.
        let mut grew = false;
        if current.is_none() {
            current = std::fs::File::open(file).ok();
        }
        if let Some(f) = current.as_mut() {
            let len = f.metadata().map_or(0, |m| m.len());
            if len > offset {
                f.seek(SeekFrom::Start(offset))?;
                let mut chunk = Vec::with_capacity((len - offset) as usize);
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(&*f, len - offset),
                    &mut chunk,
                )?;
                offset = len;
                pending.extend_from_slice(&chunk);
                let lines = take_lines(&mut pending);
                render(&lines, options, since, &mut out);
                grew = true;
            } else if !same_file(f, file) && std::fs::metadata(file).is_ok() {
                // Read to its end and renamed: a restart made it `.previous.log`, which ends
                // this follow (as kubectl logs -f ends with its container); a rotation by
                // size goes on in the new file.
                if same_file(f, &path_previous(file)) {
                    return Ok(());
                }
                current = None;
                offset = 0;
                pending.clear();
                continue;
            }
        }
        if !grew && !still_running {
            return Ok(());
        }
        if !grew {
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_what_kubectl_sends() {
        let o = LogOptions::from_query(
            "container=main&follow=true&tailLines=5&timestamps=true&limitBytes=100",
        )
        .unwrap();
        assert_eq!(o.container, "main");
        assert!(o.follow && o.timestamps);
        assert_eq!((o.tail_lines, o.limit_bytes), (Some(5), Some(100)));
        assert_eq!(LogOptions::from_query(&o.to_query()).unwrap(), o);
        let t = LogOptions::from_query("sinceTime=2026-11-30T10%3A00%3A00Z").unwrap();
        assert_eq!(t.since_time, Some(1_796_032_800));
        assert!(LogOptions::from_query("tailLines=x").is_err());
        assert!(LogOptions::from_query("sinceSeconds=0").is_err());
        assert!(LogOptions::from_query("sinceSeconds=5&sinceTime=2026-11-30T10:00:00Z").is_err());
        assert_eq!(
            LogOptions::from_query("timeout=20s&pretty=true").unwrap(),
            LogOptions::default()
        );
    }

    #[tokio::test]
    async fn lines_are_written_in_the_cri_format_and_read_back_as_kubectl_shows_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.log");
        let long = "x".repeat(MAX_LINE + 10);
        let input = format!("one\ntwo\n{long}\nlast without newline");
        copy_to_log(input.as_bytes(), file.clone(), "stdout").await;
        let raw = std::fs::read_to_string(&file).unwrap();
        let tags: Vec<&str> = raw.lines().map(|l| l.split(' ').nth(2).unwrap()).collect();
        assert_eq!(tags, ["F", "F", "P", "F", "F"]);
        assert!(raw.lines().all(|l| l.split(' ').nth(1) == Some("stdout")));

        let all = read(&file, &LogOptions::default()).unwrap();
        assert_eq!(
            String::from_utf8(all).unwrap(),
            format!("one\ntwo\n{long}\nlast without newline\n")
        );
        let tail = LogOptions {
            tail_lines: Some(2),
            ..Default::default()
        };
        assert_eq!(
            String::from_utf8(read(&file, &tail).unwrap()).unwrap(),
            format!("{long}\nlast without newline\n"),
            "the tail counts whole lines"
        );
        let stamped = LogOptions {
            timestamps: true,
            limit_bytes: Some(40),
            ..Default::default()
        };
        let out = String::from_utf8(read(&file, &stamped).unwrap()).unwrap();
        assert_eq!(out.len(), 40);
        assert!(out.starts_with("20") && out.contains("Z one\n"), "{out}");
        let future = LogOptions {
            since_time: Some(unix_now() + 3600),
            ..Default::default()
        };
        assert!(read(&file, &future).unwrap().is_empty());
        assert!(read(&dir.path().join("none.log"), &LogOptions::default())
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn a_followed_log_sends_new_lines_and_ends_when_the_container_stops() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.log");
        copy_to_log(&b"first\n"[..], file.clone(), "stdout").await;
        let writer_file = file.clone();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            copy_to_log(&b"second\n"[..], writer_file, "stderr").await;
        });
        let started = std::time::Instant::now();
        let mut got = Vec::new();
        follow(
            &file,
            &LogOptions::default(),
            // Running for a second, then stopped.
            || started.elapsed() < Duration::from_secs(1),
            &mut got,
        )
        .await
        .unwrap();
        writer.await.unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), "first\nsecond\n");
    }

    #[test]
    fn large_logs_rotate_and_only_the_newest_files_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.log");
        let rotation = LogRotation {
            max_size: 100,
            max_files: 3,
        };
        assert!(!rotate_if_large(&file, &rotation).unwrap(), "no log yet");
        std::fs::write(&file, [b'x'; 100]).unwrap();
        assert!(
            !rotate_if_large(&file, &rotation).unwrap(),
            "not above the limit"
        );
        for round in 0..4u8 {
            std::fs::write(&file, vec![b'a' + round; 101]).unwrap();
            assert!(rotate_if_large(&file, &rotation).unwrap());
            assert!(!file.exists());
        }
        let mut kept: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        kept.sort();
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(kept.iter().all(|n| n.starts_with("c.log.")));
        // The newest two: rounds 2 and 3.
        let contents: Vec<u8> = kept
            .iter()
            .map(|n| std::fs::read(dir.path().join(n)).unwrap()[0])
            .collect();
        assert_eq!(contents, [b'c', b'd']);
    }

    #[tokio::test]
    async fn a_writer_and_a_follower_go_on_across_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.log");
        let (mut input, pipe) = tokio::io::duplex(1024);
        let writer = tokio::spawn(copy_to_log(pipe, file.clone(), "stdout"));
        let rotation = LogRotation {
            max_size: 10,
            max_files: 5,
        };
        let follow_file = file.clone();
        let started = std::time::Instant::now();
        let follower = tokio::spawn(async move {
            let mut got = Vec::new();
            follow(
                &follow_file,
                &LogOptions::default(),
                || started.elapsed() < Duration::from_secs(4),
                &mut got,
            )
            .await
            .unwrap();
            got
        });
        use tokio::io::AsyncWriteExt;
        input.write_all(b"one\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(rotate_if_large(&file, &rotation).unwrap());
        // The writer looks at its path once a second.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        input.write_all(b"two\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        drop(input);
        writer.await.unwrap();
        let got = follower.await.unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), "one\ntwo\n");
        let current = std::fs::read_to_string(&file).unwrap();
        assert!(current.ends_with(" stdout F two\n"), "{current}");
    }
}
