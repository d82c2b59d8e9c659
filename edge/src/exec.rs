//! `kubectl exec` on this node (EdgeStream's exec): a command run in a container of the
//! process runtime, with the container's environment and working directory (read from its
//! running process, as `nsenter` would take them), in the pod's process markers so that it
//! dies with the pod, and with stdin, stdout, stderr and a terminal when asked.
//!
//! Over the link (see `transport::stream`), the cloud sends the request, then `stdin` data,
//! `stdin-close` and `resize` messages; the node answers with a head, then `stdout` and
//! `stderr` data, then `exit` carrying the Kubernetes `Status` that the remote-command protocol
//! ends with (`Success`, or `Failure` with reason `NonZeroExitCode` and an `ExitCode` cause),
//! which `kubectl exec` turns into its own exit code. The cloud going away (kubectl
//! interrupted) kills the command's process group.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use transport::stream::{StreamHead, StreamMessage};
use transport::{StreamReader, StreamWriter};

use crate::edged::procs::{self, GroupRecord};

/// The query of `GET|POST .../pods/{name}/exec` (Kubernetes' `PodExecOptions`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// argv; at least one element.
    pub command: Vec<String>,
    /// The container; may be empty only for a pod with one container.
    pub container: String,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    /// Run the command on a terminal (stderr then goes to stdout, as with a real terminal).
    pub tty: bool,
}

impl ExecOptions {
    /// Parses the query string of the `exec` subresource; errors name the bad parameter.
    pub fn from_query(query: &str) -> Result<ExecOptions, String> {
        let mut options = ExecOptions::default();
        for (name, value) in crate::edged::logs::query_pairs(query)? {
            let flag = || matches!(value.as_str(), "" | "true" | "1");
            match name.as_str() {
                "command" => options.command.push(value.clone()),
                "container" => options.container = value.clone(),
                "stdin" => options.stdin = flag(),
                "stdout" => options.stdout = flag(),
                "stderr" => options.stderr = flag(),
                "tty" => options.tty = flag(),
                _ => {}
            }
        }
        if options.command.is_empty() {
            return Err("you must specify at least 1 command".into());
        }
        if !(options.stdin || options.stdout || options.stderr) {
            return Err("you must specify at least 1 of stdin, stdout, stderr".into());
        }
        Ok(options)
    }
}

/// What a command runs with: the container's environment and working directory.
pub struct ExecContext {
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// The container's process group (to find it still running).
    pub group: GroupRecord,
    /// A container of the CRI runtime instead of a process: the command runs through CRI
    /// `ExecSync` (see [`run_cri`]).
    pub cri: Option<crate::edged::cri::ExecTarget>,
}

/// The running container's environment and working directory, from its recorded process
/// group's leader (`<pod dir>/<container>.pgroup`). `None` if it is not running.
pub fn context(pod_dir: &Path, container: &str) -> Option<ExecContext> {
    if let Some(cri) = crate::edged::cri::exec_target(pod_dir, container) {
        return Some(ExecContext {
            env: Vec::new(),
            cwd: PathBuf::new(),
            group: GroupRecord {
                boot: String::new(),
                pgid: 0,
                start: 0,
            },
            cri: Some(cri),
        });
    }
    let record =
        std::fs::read_to_string(pod_dir.join(format!("{container}{}", procs::RECORD_SUFFIX)))
            .ok()?;
    let group = GroupRecord::decode(&record)?;
    if !group.leader_alive(&procs::boot_id()) {
        return None;
    }
    let environ = std::fs::read(format!("/proc/{}/environ", group.pgid)).ok()?;
    let env = environ
        .split(|b| *b == 0)
        .filter_map(|entry| {
            let entry = std::str::from_utf8(entry).ok()?;
            let (k, v) = entry.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect();
    let cwd = std::fs::read_link(format!("/proc/{}/cwd", group.pgid)).ok()?;
    Some(ExecContext {
        env,
        cwd,
        group,
        cri: None,
    })
}

/// The remote-command protocol's final `Status` for an exit code (client-go's
/// `remotecommand` reads `NonZeroExitCode` and the `ExitCode` cause).
pub fn exit_status(command: &[String], code: i32) -> Value {
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!(
            "command terminated with non-zero exit code: error executing command {command:?}, exit code {code}"
        ),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
}

/// One exec session's ends, whatever carries them (the link to the cloud, or MetaServer's
/// WebSocket for someone at the node): input from the client (`Stdin`, `StdinClose`,
/// `Resize`; the channel closing means no more input), output to it (`Stdout`, `Stderr`, then
/// `Exit`; a closed channel means the client is gone), and a token cancelled when the client
/// went away (the command's process group is killed then).
pub struct Session {
    pub input: tokio::sync::mpsc::Receiver<StreamMessage>,
    pub output: tokio::sync::mpsc::Sender<StreamMessage>,
    pub cancelled: tokio_util::sync::CancellationToken,
}

impl Session {
    /// A session and the other ends of its channels: (session, input sender, output receiver).
    pub fn new() -> (
        Session,
        tokio::sync::mpsc::Sender<StreamMessage>,
        tokio::sync::mpsc::Receiver<StreamMessage>,
    ) {
        let (in_tx, input) = tokio::sync::mpsc::channel(8);
        let (output, out_rx) = tokio::sync::mpsc::channel(8);
        let session = Session {
            input,
            output,
            cancelled: tokio_util::sync::CancellationToken::new(),
        };
        (session, in_tx, out_rx)
    }
}

/// Ends a session with a command that could not start: its message on stderr, then the exit
/// code runtimes give (127 not found, 126 otherwise).
async fn not_started(session: &Session, command: &[String], message: String, code: i32) {
    let _ = session
        .output
        .send(StreamMessage::Stderr(message.into_bytes()))
        .await;
    let _ = session
        .output
        .send(StreamMessage::exit(&exit_status(command, code)))
        .await;
}

/// Runs the command and carries its streams through `session` until it exits (then the final
/// status) or the client goes away (then its process group is killed).
pub async fn run(options: ExecOptions, target: ExecContext, mut session: Session) {
    if let Some(cri) = target.cri {
        run_cri(options, cri, session).await;
        return;
    }
    let mut command = tokio::process::Command::new(&options.command[0]);
    command
        .args(&options.command[1..])
        .env_clear()
        .envs(target.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&target.cwd)
        .kill_on_drop(true);
    let pty = if options.tty {
        match crate::pty::open() {
            Ok(pair) => Some(pair),
            Err(e) => {
                let message = format!("cannot allocate a terminal: {e}\n");
                not_started(&session, &options.command, message, 126).await;
                return;
            }
        }
    } else {
        None
    };
    if let Some((_, slave)) = &pty {
        match crate::pty::stdio(slave) {
            Ok((a, b, c)) => {
                command.stdin(a).stdout(b).stderr(c);
            }
            Err(_) => {
                let message = "cannot set up the terminal\n".to_owned();
                not_started(&session, &options.command, message, 126).await;
                return;
            }
        }
        // SAFETY: between fork and exec only async-signal-safe calls: a new session whose
        // controlling terminal is the pty (its stdin), and death with edgecore.
        unsafe {
            command.pre_exec(crate::pty::become_session_leader);
        }
    } else {
        // A group of its own (the terminal case gets one from setsid).
        command.process_group(0);
        command
            .stdin(if options.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(if options.stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(if options.stderr {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            // As runtimes answer: the command could not start; kubectl exits with its code.
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            let message = format!("exec: {:?}: {e}\n", options.command[0]);
            not_started(&session, &options.command, message, code).await;
            return;
        }
    };
    let pgid = child.id().map_or(0, |p| p as i32);
    drop(target.group);

    // Each output of the command (or the terminal) is pumped by a task of its own into one
    // channel, so that one loop owns the session's output.
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<StreamMessage>(8);
    let mut readers = Vec::new();
    let mut pty_writer: Option<tokio::fs::File> = None;
    let mut pty_master: Option<OwnedFd> = None;
    if let Some((master, slave)) = pty {
        drop(slave);
        if let (Ok(reader), Ok(writer)) = (master.try_clone(), master.try_clone()) {
            pty_writer = Some(tokio::fs::File::from_std(std::fs::File::from(writer)));
            let reader = tokio::fs::File::from_std(std::fs::File::from(reader));
            readers.push(tokio::spawn(pump(
                reader,
                out_tx.clone(),
                StreamMessage::Stdout,
            )));
        }
        pty_master = Some(master);
    } else {
        if let Some(stdout) = child.stdout.take() {
            readers.push(tokio::spawn(pump(
                stdout,
                out_tx.clone(),
                StreamMessage::Stdout,
            )));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(tokio::spawn(pump(
                stderr,
                out_tx.clone(),
                StreamMessage::Stderr,
            )));
        }
    }
    drop(out_tx);
    let mut stdin: Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> = match pty_writer {
        Some(w) => Some(Box::new(w)),
        None => child
            .stdin
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>),
    };

    let mut input_open = true;
    let mut output_open = true;
    let cancelled = session.cancelled.clone();
    let exit = loop {
        tokio::select! {
            status = child.wait() => break status,
            // The client went away (kubectl interrupted): the command goes with it.
            _ = cancelled.cancelled() => {
                procs::signal_group(pgid, libc::SIGKILL);
                let _ = child.wait().await;
                return;
            }
            message = session.input.recv(), if input_open => match message {
                Some(StreamMessage::Stdin(bytes)) => {
                    if let Some(w) = stdin.as_mut() {
                        if w.write_all(&bytes).await.is_err() || w.flush().await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Some(StreamMessage::StdinClose) => {
                    if options.tty {
                        // A terminal has no end of input: ^D is how a shell hears it.
                        if let Some(w) = stdin.as_mut() {
                            let _ = w.write_all(&[4]).await;
                        }
                    } else {
                        stdin = None;
                    }
                }
                Some(StreamMessage::Resize { width, height }) => {
                    if let Some(master) = &pty_master {
                        crate::pty::set_window(master, width, height);
                    }
                }
                Some(_) => {}
                // The client finished its side: no more input.
                None => { input_open = false; stdin = None; }
            },
            message = out_rx.recv(), if output_open => match message {
                Some(message) => {
                    if session.output.send(message).await.is_err() {
                        procs::signal_group(pgid, libc::SIGKILL);
                        let _ = child.wait().await;
                        return;
                    }
                }
                None => output_open = false,
            },
        }
    };
    // What it left in its group goes with it; its last output is sent, then its status.
    procs::signal_group(pgid, libc::SIGKILL);
    drop(stdin);
    drop(pty_master);
    let drain = async {
        while let Some(message) = out_rx.recv().await {
            if session.output.send(message).await.is_err() {
                return false;
            }
        }
        true
    };
    if !tokio::time::timeout(Duration::from_secs(2), drain)
        .await
        .unwrap_or(true)
    {
        return;
    }
    for reader in readers {
        reader.abort();
    }
    let code = match exit {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
        }
        Err(_) => 255,
    };
    let _ = session
        .output
        .send(StreamMessage::exit(&exit_status(&options.command, code)))
        .await;
}

/// How long a command in a CRI container may run (`ExecSync` has no streaming: its output
/// comes at its end).
pub const CRI_EXEC_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs the command in a CRI container. Without stdin or a terminal, with `ExecSync`: stdout
/// and stderr are sent when it ends, then its exit status. With either, through CRI's
/// streaming `Exec` ([`crate::edged::cri_stream`]): output as it comes, input (and its end),
/// terminal sizes. The client going away abandons the call (containerd then kills the
/// command).
pub async fn run_cri(
    options: ExecOptions,
    target: crate::edged::cri::ExecTarget,
    session: Session,
) {
    if options.stdin || options.tty {
        // Interactive: CRI's streaming Exec, relayed from the runtime's streaming server.
        let streams = crate::edged::cri_stream::Streams {
            stdin: options.stdin,
            stdout: options.stdout,
            stderr: options.stderr,
            tty: options.tty,
        };
        let url = target
            .client
            .stream_url(&target.container_id, Some(options.command.clone()), streams)
            .await;
        match url {
            Ok(url) => {
                crate::edged::cri_stream::relay(&url, streams, &options.command, session).await
            }
            Err(e) => {
                let message = format!("exec {:?}: {}\n", options.command[0], e.message());
                not_started(&session, &options.command, message, 126).await;
            }
        }
        return;
    }
    let exec = target.client.exec_sync(
        &target.container_id,
        options.command.clone(),
        CRI_EXEC_TIMEOUT,
    );
    let result = tokio::select! {
        result = exec => result,
        _ = session.cancelled.cancelled() => return,
    };
    match result {
        Ok(response) => {
            if options.stdout && !response.stdout.is_empty() {
                let _ = session
                    .output
                    .send(StreamMessage::Stdout(response.stdout))
                    .await;
            }
            if options.stderr && !response.stderr.is_empty() {
                let _ = session
                    .output
                    .send(StreamMessage::Stderr(response.stderr))
                    .await;
            }
            let _ = session
                .output
                .send(StreamMessage::exit(&exit_status(
                    &options.command,
                    response.exit_code,
                )))
                .await;
        }
        Err(e) => {
            // As kubelet: a command that cannot run (not found, no such container) is 126/127
            // to kubectl, with the runtime's words.
            let code = if e.message().contains("not found") || e.message().contains("no such file")
            {
                127
            } else {
                126
            };
            let message = format!("exec {:?}: {}\n", options.command[0], e.message());
            not_started(&session, &options.command, message, code).await;
        }
    }
}

/// Carries a session over the link: the cloud's messages in, the session's out, until the
/// final status went out or either side is gone (the cloud resetting its side, or stopping
/// reading, cancels the session).
pub async fn over_link(
    options: ExecOptions,
    target: ExecContext,
    input: StreamReader,
    output: StreamWriter,
) {
    session_over_link(input, output, move |session| run(options, target, session)).await
}

/// Carries any remote-command session (exec, attach) over the link: the head, then the cloud's
/// messages into the session `runner` runs, and its output back, until the final status went
/// out or either side is gone (which cancels the session).
pub async fn session_over_link<F, Fut>(mut input: StreamReader, mut output: StreamWriter, runner: F)
where
    F: FnOnce(Session) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if output.send(&StreamHead::Ok.to_message()).await.is_err() {
        return;
    }
    let (session, in_tx, mut out_rx) = Session::new();
    let cancel = session.cancelled.clone();
    let runner = tokio::spawn(runner(session));
    let stopped = output.stopped();
    tokio::pin!(stopped);
    let mut in_tx = Some(in_tx);
    loop {
        tokio::select! {
            message = out_rx.recv() => match message {
                Some(message) => {
                    if output.send(&message.to_message()).await.is_err() {
                        cancel.cancel();
                        break;
                    }
                }
                None => {
                    let _ = output.finish();
                    break;
                }
            },
            message = input.next(), if in_tx.is_some() => match message {
                Ok(Some(message)) => {
                    let Ok(message) = StreamMessage::from_message(&message) else { continue };
                    if let Some(tx) = &in_tx {
                        let _ = tx.send(message).await;
                    }
                }
                Ok(None) => in_tx = None,
                Err(_) => {
                    cancel.cancel();
                    break;
                }
            },
            _ = &mut stopped => {
                cancel.cancel();
                break;
            }
        }
    }
    let _ = runner.await;
}

/// Copies one output of the command into messages until it ends (a terminal's EIO after the
/// command closed it is its end too).
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    to: tokio::sync::mpsc::Sender<StreamMessage>,
    wrap: fn(Vec<u8>) -> StreamMessage,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.send(wrap(buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_what_kubectl_sends() {
        let o = ExecOptions::from_query(
            "command=sh&command=-c&command=echo%20hi%3B%20exit%203&container=main&stdout=true&stderr=true",
        )
        .unwrap();
        assert_eq!(o.command, ["sh", "-c", "echo hi; exit 3"]);
        assert_eq!(o.container, "main");
        assert!(o.stdout && o.stderr && !o.stdin && !o.tty);
        assert!(ExecOptions::from_query("stdout=true").is_err());
        assert!(ExecOptions::from_query("command=ls").is_err());
    }

    #[test]
    fn the_final_status_carries_the_exit_code_as_client_go_reads_it() {
        let ok = exit_status(&["true".into()], 0);
        assert_eq!(ok["status"], "Success");
        let failed = exit_status(&["false".into()], 3);
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
    }
}
