//! `kubectl attach` on this node: the running container's output and, for a container started
//! with `stdin: true`, its input, over the same remote-command protocol as exec
//! ([`crate::exec::Session`]: over the link for the cloud, over WebSocket for MetaServer).
//!
//! The process runtime sends a container's stdout and stderr through pipes into its log file
//! (CRI format), so attach follows that file from its end at the time of attaching: each line
//! goes out on its own stream (stdout or stderr) as soon as it is written, whole lines only (a
//! line without its end, such as a prompt, comes once it ends or reaches 16 KiB). Input goes
//! to the pipe the runtime keeps as the container's stdin ([`ContainerStdin`]); `stdinOnce`
//! closes it when the first session that wrote to it ends. A container started with
//! `tty: true` runs on a terminal whose master the runtime holds ([`ContainerTerminal`]): its
//! output goes to the session raw, as it comes (prompts included), input goes to the terminal
//! and resizes set its window size. The session ends with `Success` when the container stops
//! (or restarts), and a client that leaves never stops the container.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use transport::stream::StreamMessage;

use crate::edged::process::{ContainerStdin, ContainerTerminal};
use crate::edged::procs::{self, GroupRecord};
use crate::exec::{exit_status, Session};

/// How often the log file is looked at for new lines.
const POLL: Duration = Duration::from_millis(100);

/// The query of `GET|POST .../pods/{name}/attach` (Kubernetes' `PodAttachOptions`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachOptions {
    /// The container; may be empty only for a pod with one container.
    pub container: String,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    /// Asked for a terminal: stderr goes to stdout, as a terminal shows it (a container
    /// without one keeps its streams apart in the log).
    pub tty: bool,
}

impl AttachOptions {
    /// Parses the query string of the `attach` subresource; errors name the bad parameter.
    pub fn from_query(query: &str) -> Result<AttachOptions, String> {
        let mut options = AttachOptions::default();
        for (name, value) in crate::edged::logs::query_pairs(query)? {
            let flag = || matches!(value.as_str(), "" | "true" | "1");
            match name.as_str() {
                "container" => options.container = value.clone(),
                "stdin" => options.stdin = flag(),
                "stdout" => options.stdout = flag(),
                "stderr" => options.stderr = flag(),
                "tty" => options.tty = flag(),
                _ => {}
            }
        }
        if !(options.stdin || options.stdout || options.stderr) {
            return Err("you must specify at least 1 of stdin, stdout, stderr".into());
        }
        Ok(options)
    }
}

/// The running container an attach reaches.
pub struct AttachTarget {
    /// Its log file (`<pod dir>/<container>.log`).
    pub log: PathBuf,
    /// Its process group (the session ends when its leader is gone).
    pub group: GroupRecord,
    /// Its stdin, if it was started with `stdin: true` by this edgecore.
    pub stdin: Option<ContainerStdin>,
    /// Its terminal, if it was started with `tty: true` by this edgecore.
    pub terminal: Option<ContainerTerminal>,
    /// A container of the CRI runtime instead: the session is CRI's streaming `Attach`.
    pub cri: Option<crate::edged::cri::ExecTarget>,
}

/// One CRI log line: (stream, whether the line ends here, content).
fn parse(line: &[u8]) -> Option<(&[u8], bool, &[u8])> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let _time = parts.next()?;
    let stream = parts.next()?;
    let tag = parts.next()?;
    Some((stream, tag != b"P", parts.next().unwrap_or_default()))
}

/// The client's side of a session: what it writes goes to the container's stdin (if the
/// session asked for stdin), resizes to its terminal (if it has one).
struct Input<'a> {
    stdin: Option<&'a ContainerStdin>,
    terminal: Option<&'a ContainerTerminal>,
    open: bool,
    wrote: bool,
}

impl<'a> Input<'a> {
    fn new(options: &AttachOptions, target: &'a AttachTarget) -> Self {
        Input {
            stdin: target.stdin.as_ref().filter(|_| options.stdin),
            terminal: target.terminal.as_ref(),
            open: true,
            wrote: false,
        }
    }

    /// One message from the client (`None`: it sent its last).
    async fn take(&mut self, message: Option<StreamMessage>) {
        match message {
            Some(StreamMessage::Stdin(bytes)) => {
                if let Some(stdin) = self.stdin {
                    self.wrote = true;
                    stdin.write(&bytes).await;
                }
            }
            Some(StreamMessage::Resize { width, height }) => {
                if let Some(terminal) = self.terminal {
                    terminal.resize(width, height);
                }
            }
            Some(StreamMessage::StdinClose) | None => {
                self.open = false;
                if let Some(stdin) = self.stdin.filter(|s| s.once) {
                    stdin.close().await;
                }
            }
            Some(_) => {}
        }
    }

    /// At the session's end: `stdinOnce` closes the stdin this session wrote to.
    async fn finish(self) {
        if self.wrote {
            if let Some(stdin) = self.stdin.filter(|s| s.once) {
                stdin.close().await;
            }
        }
    }
}

/// An attach session to a container's terminal: its output raw as it comes.
async fn run_terminal(
    options: AttachOptions,
    target: AttachTarget,
    terminal: ContainerTerminal,
    mut session: Session,
) {
    let boot = procs::boot_id();
    let mut output = terminal.subscribe();
    let mut input = Input::new(&options, &target);
    let wanted = options.stdout || options.stderr;
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = session.cancelled.cancelled() => break,
            message = session.input.recv(), if input.open => input.take(message).await,
            chunk = output.recv() => match chunk {
                Ok(bytes) => {
                    if wanted && session.output.send(StreamMessage::Stdout(bytes)).await.is_err() {
                        break;
                    }
                }
                // A slow client misses output rather than hold the container back.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    let _ = session.output.send(StreamMessage::exit(&exit_status(&[], 0))).await;
                    break;
                }
            },
            // The terminal may outlive the container (a process that left its group holds
            // it): the container's end is its leader's.
            _ = tick.tick() => {
                if !target.group.leader_alive(&boot) {
                    while let Ok(bytes) = output.try_recv() {
                        if wanted {
                            let _ = session.output.send(StreamMessage::Stdout(bytes)).await;
                        }
                    }
                    let _ = session.output.send(StreamMessage::exit(&exit_status(&[], 0))).await;
                    break;
                }
            }
        }
    }
    input.finish().await;
}

/// Runs an attach session until the container stops (then `Success`) or the client leaves.
pub async fn run(options: AttachOptions, target: AttachTarget, mut session: Session) {
    if let Some(cri) = &target.cri {
        // The runtime's own attach: the container's stdin, stdout, stderr and terminal.
        let streams = crate::edged::cri_stream::Streams {
            stdin: options.stdin,
            stdout: options.stdout,
            stderr: options.stderr,
            tty: options.tty,
        };
        let command = ["attach".to_owned()];
        match cri
            .client
            .stream_url(&cri.container_id, None, streams)
            .await
        {
            Ok(url) => crate::edged::cri_stream::relay(&url, streams, &command, session).await,
            Err(e) => {
                let _ = session
                    .output
                    .send(StreamMessage::Stderr(
                        format!("attach: {}\n", e.message()).into_bytes(),
                    ))
                    .await;
                let _ = session
                    .output
                    .send(StreamMessage::exit(&exit_status(&command, 126)))
                    .await;
            }
        }
        return;
    }
    if let Some(terminal) = target.terminal.clone() {
        run_terminal(options, target, terminal, session).await;
        return;
    }
    let boot = procs::boot_id();
    let mut offset = std::fs::metadata(&target.log).map_or(0, |m| m.len());
    let mut pending: Vec<u8> = Vec::new();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut input = Input::new(&options, &target);
    'session: loop {
        tokio::select! {
            _ = session.cancelled.cancelled() => break,
            message = session.input.recv(), if input.open => input.take(message).await,
            _ = tick.tick() => {
                let alive = target.group.leader_alive(&boot);
                let len = std::fs::metadata(&target.log).map_or(0, |m| m.len());
                if len < offset {
                    break; // rotated: the container restarted, this instance is over
                }
                if len > offset {
                    let Ok(mut file) = std::fs::File::open(&target.log) else { break };
                    if file.seek(SeekFrom::Start(offset)).is_err() {
                        break;
                    }
                    let mut chunk = Vec::with_capacity((len - offset) as usize);
                    if (&mut file).take(len - offset).read_to_end(&mut chunk).is_err() {
                        break;
                    }
                    offset += chunk.len() as u64;
                    pending.extend_from_slice(&chunk);
                    while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=end).collect();
                        let Some((stream, full, content)) = parse(&line[..line.len() - 1]) else {
                            continue;
                        };
                        let mut bytes = content.to_vec();
                        if full {
                            bytes.push(b'\n');
                        }
                        let message = if stream == b"stderr" && !options.tty {
                            if !options.stderr {
                                continue;
                            }
                            StreamMessage::Stderr(bytes)
                        } else {
                            if !(options.stdout || (options.tty && options.stderr)) {
                                continue;
                            }
                            StreamMessage::Stdout(bytes)
                        };
                        if session.output.send(message).await.is_err() {
                            break 'session;
                        }
                    }
                    continue;
                }
                if !alive {
                    let _ = session
                        .output
                        .send(StreamMessage::exit(&exit_status(&[], 0)))
                        .await;
                    break;
                }
            }
        }
    }
    input.finish().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_what_kubectl_sends() {
        let o =
            AttachOptions::from_query("container=main&stdin=true&stdout=true&tty=false").unwrap();
        assert_eq!(o.container, "main");
        assert!(o.stdin && o.stdout && !o.stderr && !o.tty);
        assert!(AttachOptions::from_query("container=main").is_err());
    }

    #[test]
    fn cri_lines_give_their_stream_and_end() {
        assert_eq!(
            parse(b"2026-01-01T00:00:00.000000000Z stderr F oops"),
            Some((&b"stderr"[..], true, &b"oops"[..]))
        );
        assert_eq!(
            parse(b"2026-01-01T00:00:00.000000000Z stdout P part"),
            Some((&b"stdout"[..], false, &b"part"[..]))
        );
    }
}
