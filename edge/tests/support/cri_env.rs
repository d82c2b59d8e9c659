//! A throw-away CRI environment for tests: Debian's `docker-registry` on a free loopback port
//! with a busybox image pushed to it, and containerd 1.6 with its own root, state, socket,
//! runc root, CNI bridge (a subnet of its own) and an offline pause image, all under a short
//! temp dir (`scripts/cri-env.sh up`). Dropping it (also on a panic) removes every pod sandbox
//! through CRI (`StopPodSandbox`, `RemovePodSandbox`: CNI releases the netns and IP), then runs
//! `scripts/cri-env.sh down` (containerd, registry, shims, mounts, netns, bridge, temp dir).
//!
//! Missing tools are a failure naming them and `scripts/setup.sh`, never a skip.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use edge::edged::cri::CriClient;

/// What `scripts/cri-env.sh up` made.
pub struct CriEnv {
    /// The environment's directory (`/tmp/kcri.XXXX`).
    pub dir: PathBuf,
    /// `unix://DIR/containerd/containerd.sock`.
    pub endpoint: String,
    /// `127.0.0.1:PORT` of the registry.
    pub registry: String,
    /// `127.0.0.1:PORT/kedge/busybox:1` (Cmd `/bin/sh`).
    pub busybox: String,
    /// `127.0.0.1:PORT/kedge/private:1` in a registry that wants [`PRIVATE_AUTH`].
    pub private_image: String,
    /// `127.0.0.1:PORT` of that registry.
    pub private_registry: String,
    /// The pods' CNI subnet, e.g. `10.123.0.0/16`.
    pub subnet: String,
    /// For the CRI calls of the test.
    pub rt: tokio::runtime::Runtime,
    pub client: CriClient,
}

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("scripts")
}

/// The user and password of the environment's private registry.
pub const PRIVATE_AUTH: (&str, &str) = ("kedge", "s3cret-pass");

/// Fails (never skips) when a tool the environment needs is missing.
pub fn require_tools() {
    let tools: [(&str, &str); 8] = [
        ("htpasswd", "apache2-utils"),
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
        ("docker-registry", "docker-registry"),
        ("/usr/lib/cni/bridge", "containernetworking-plugins"),
        ("/usr/lib/cni/host-local", "containernetworking-plugins"),
        ("/bin/busybox", "busybox-static"),
    ];
    let mut missing = Vec::new();
    for (tool, package) in tools {
        let found = if tool.starts_with('/') {
            Path::new(tool).exists()
        } else {
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "command -v {tool} || test -x /usr/sbin/{tool} || test -x /sbin/{tool}"
                ))
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !found {
            missing.push(format!("{tool} (Debian package {package})"));
        }
    }
    assert!(
        missing.is_empty(),
        "the CRI tests need containerd, runc, the CNI plugins, docker-registry and \
         busybox-static (and htpasswd); missing: {}. Run scripts/setup.sh (as root) to install them.",
        missing.join(", ")
    );
}

impl CriEnv {
    /// Brings the environment up (about 2 s) and connects a CRI client to it.
    pub fn up() -> CriEnv {
        require_tools();
        let dir = tempfile::Builder::new()
            .prefix("kcri.")
            .tempdir_in("/tmp")
            .expect("temp dir")
            .keep();
        // A subnet of its own, so that environments of concurrent runs do not collide.
        static ENVS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = ENVS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let subnet = format!(
            "10.{}.0.0/16",
            100 + (u32::from(rand_byte()) + n * 37) % 100
        );
        let out = Command::new(scripts().join("cri-env.sh"))
            .arg("up")
            .arg(&dir)
            .env("CNI_SUBNET", &subnet)
            .env(
                "PRIVATE_AUTH",
                format!("{}:{}", PRIVATE_AUTH.0, PRIVATE_AUTH.1),
            )
            .env("PUSH_IMAGE", scripts().join("push-image.sh"))
            .output()
            .expect("run scripts/cri-env.sh");
        if !out.status.success() {
            let _ = Command::new(scripts().join("cri-env.sh"))
                .arg("down")
                .arg(&dir)
                .output();
            panic!(
                "scripts/cri-env.sh up failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let env: HashMap<String, String> = std::fs::read_to_string(dir.join("env"))
            .expect("DIR/env")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio");
        let endpoint = env["CRI_ENDPOINT"].clone();
        let client = rt
            .block_on(CriClient::connect(&endpoint))
            .expect("CRI answers");
        CriEnv {
            dir,
            endpoint,
            registry: env["REGISTRY"].clone(),
            busybox: env["BUSYBOX_IMAGE"].clone(),
            private_image: env["PRIVATE_IMAGE"].clone(),
            private_registry: env["PRIVATE_REGISTRY"].clone(),
            subnet,
            rt,
            client,
        }
    }

    /// Builds and pushes an image of its own (busybox with `image_env`, e.g. `A=1`, in its
    /// config, so its id differs from the others') as `repo:tag` to the registry; returns the
    /// reference a pod names.
    pub fn push(&self, repo_tag: &str, image_env: &str) -> String {
        let out = Command::new(scripts().join("push-image.sh"))
            .arg(&self.registry)
            .arg(repo_tag)
            .env("IMAGE_ENV", image_env)
            .output()
            .expect("run scripts/push-image.sh");
        assert!(
            out.status.success(),
            "push-image.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("{}/{repo_tag}", self.registry)
    }

    /// Every pod sandbox the runtime has (ready or not).
    pub fn sandboxes(&self) -> Vec<k8s_cri::v1::PodSandbox> {
        self.rt
            .block_on(self.client.sandboxes(HashMap::new()))
            .expect("ListPodSandbox")
    }

    /// The sandboxes of the pod with this uid.
    pub fn sandboxes_of(&self, uid: &str) -> Vec<k8s_cri::v1::PodSandbox> {
        let labels = HashMap::from([(edge::edged::cri::LABEL_POD_UID.to_owned(), uid.to_owned())]);
        self.rt
            .block_on(self.client.sandboxes(labels))
            .expect("ListPodSandbox")
    }

    /// The containers of the pod with this uid.
    pub fn containers_of(&self, uid: &str) -> Vec<k8s_cri::v1::Container> {
        let labels = HashMap::from([(edge::edged::cri::LABEL_POD_UID.to_owned(), uid.to_owned())]);
        self.rt
            .block_on(self.client.containers("", labels))
            .expect("ListContainers")
    }
}

impl CriEnv {
    /// SIGKILLs containerd (its shims, and so the containers, live on).
    pub fn kill_containerd(&self) {
        let pid = std::fs::read_to_string(self.dir.join("containerd/pid")).expect("containerd pid");
        let pid: i32 = pid.trim().parse().expect("a pid");
        // SAFETY: a plain kill(2) of the containerd this environment started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let stat = format!("/proc/{pid}/stat");
        let start = std::time::Instant::now();
        while std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z")) {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "containerd still alive"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Starts containerd again on the same configuration (it takes up the running shims).
    pub fn start_containerd(&self) {
        // Through a shell, as scripts/cri-env.sh does: containerd is nobody's child here, and
        // `down` kills it by its pid file.
        let dir = self.dir.display();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "setsid containerd --config {dir}/containerd/config.toml \
                 >>{dir}/containerd/log 2>&1 </dev/null & echo $! >{dir}/containerd/pid"
            ))
            .output()
            .expect("start containerd");
        assert!(out.status.success(), "containerd did not start");
        let start = std::time::Instant::now();
        while self.rt.block_on(self.client.version()).is_err() {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "containerd did not come back"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

fn rand_byte() -> u8 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    ((nanos ^ std::process::id()) % 251) as u8
}

impl Drop for CriEnv {
    fn drop(&mut self) {
        // Through CRI first: CNI releases each pod's netns, IP and port rules.
        let sandboxes = self
            .rt
            .block_on(self.client.sandboxes(HashMap::new()))
            .unwrap_or_default();
        for sandbox in sandboxes {
            let _ = self.rt.block_on(self.client.remove_sandbox(&sandbox.id));
        }
        let out = Command::new(scripts().join("cri-env.sh"))
            .arg("down")
            .arg(&self.dir)
            .output();
        if let Ok(out) = out {
            if !out.status.success() {
                eprintln!(
                    "scripts/cri-env.sh down: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}
