//! Image garbage collection and the node's image list, for the CRI runtime, as kubelet's
//! `ImageGCManager` does them.
//!
//! - [`ImageGc`] is the sans-IO core: it is shown the runtime's images, the images its
//!   containers use and the image filesystem's usage, with `now`, and answers which images to
//!   remove. When usage reaches `high_threshold_percent` of the filesystem, unused images are
//!   removed, least recently used first, until usage would be down to `low_threshold_percent`.
//!   An image is never removed while any container (running or exited) uses it, when the
//!   runtime pins it or it is the runtime's sandbox (pause) image, or before it has been known
//!   for `min_age` (so an image pulled for a container about to be created is not taken away).
//!   Defaults are kubelet's: 85 %, 80 %, 2 minutes, every 5 minutes.
//! - [`run`] is the async shell: every `period` it asks the runtime (`ListImages`,
//!   `ListContainers`, `ImageFsInfo`, the verbose `Status` for the sandbox image), lets the
//!   core decide, calls `RemoveImage`, and publishes the node's `status.images` (kubelet's
//!   shape: `names` (digests, then tags) and `sizeBytes`, largest first, at most
//!   [`MAX_NODE_IMAGES`], kubelet's `--node-status-max-images`).
//!
//! Dead containers are collected by the runtime itself (one exited instance per container is
//! kept, for `kubectl logs --previous`), as kubelet's container GC does with its defaults.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::cri::{CriClient, CALL_TIMEOUT};

/// kubelet's `--node-status-max-images` default: the node's status lists this many images.
pub const MAX_NODE_IMAGES: usize = 50;

/// When and how much to collect (kubelet's `--image-gc-high-threshold`,
/// `--image-gc-low-threshold`, `--image-minimum-gc-age`; the period is kubelet's fixed 5 min).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageGcPolicy {
    /// Usage of the image filesystem, in percent (0–100), at which collection starts; 100
    /// turns collection off.
    pub high_threshold_percent: u8,
    /// Usage, in percent, collection brings the filesystem down to (≤ the high threshold).
    pub low_threshold_percent: u8,
    /// An image known for less than this is never removed.
    pub min_age: Duration,
    /// How often usage is looked at (and the node's image list refreshed).
    pub period: Duration,
}

impl Default for ImageGcPolicy {
    fn default() -> Self {
        ImageGcPolicy {
            high_threshold_percent: 85,
            low_threshold_percent: 80,
            min_age: Duration::from_secs(120),
            period: Duration::from_secs(300),
        }
    }
}

impl ImageGcPolicy {
    /// Checks the thresholds as kubelet does.
    ///
    /// # Errors
    /// A threshold above 100, or the low threshold above the high one.
    pub fn validate(&self) -> Result<(), String> {
        if self.high_threshold_percent > 100 {
            return Err(format!(
                "--image-gc-high-threshold {} is not a percentage (0-100)",
                self.high_threshold_percent
            ));
        }
        if self.low_threshold_percent > self.high_threshold_percent {
            return Err(format!(
                "--image-gc-low-threshold {} is above --image-gc-high-threshold {}",
                self.low_threshold_percent, self.high_threshold_percent
            ));
        }
        if self.period.is_zero() {
            return Err("--image-gc-period must be above zero".into());
        }
        Ok(())
    }
}

/// One image as the runtime lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// The runtime's image id (`sha256:…` of the config for containerd).
    pub id: String,
    /// Bytes it takes, as the runtime says.
    pub size_bytes: u64,
    /// `repo:tag` references.
    pub tags: Vec<String>,
    /// `repo@sha256:…` references.
    pub digests: Vec<String>,
    /// The runtime keeps it whatever happens (CRI's `pinned`).
    pub pinned: bool,
}

/// The image filesystem: bytes in all and bytes still available (statvfs of its mountpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsUsage {
    pub capacity_bytes: u64,
    pub available_bytes: u64,
}

impl FsUsage {
    /// The used share in whole percent, as kubelet rounds it (0 for an empty filesystem).
    pub fn used_percent(&self) -> u64 {
        if self.capacity_bytes == 0 {
            return 0;
        }
        let available = self.available_bytes.min(self.capacity_bytes);
        100 - (u128::from(available) * 100 / u128::from(self.capacity_bytes)) as u64
    }
}

/// The collector's memory: when each image was first seen and last used.
#[derive(Debug, Default)]
pub struct ImageGc {
    policy: ImageGcPolicy,
    seen: HashMap<String, Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    first: Instant,
    last_used: Instant,
}

/// What one pass decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Images to remove, in this order.
    pub remove: Vec<String>,
    /// Bytes that removing them frees.
    pub freed_bytes: u64,
    /// Bytes the pass wanted to free (0 below the high threshold).
    pub wanted_bytes: u64,
}

impl ImageGc {
    pub fn new(policy: ImageGcPolicy) -> Self {
        ImageGc {
            policy,
            seen: HashMap::new(),
        }
    }

    /// Records what the runtime holds at `now`: images in `in_use` are used now, new ones are
    /// first seen now, and gone ones are forgotten.
    pub fn observe(&mut self, now: Instant, images: &[ImageRecord], in_use: &HashSet<String>) {
        let present: HashSet<&str> = images.iter().map(|i| i.id.as_str()).collect();
        self.seen.retain(|id, _| present.contains(id.as_str()));
        for image in images {
            let seen = self.seen.entry(image.id.clone()).or_insert(Seen {
                first: now,
                last_used: now,
            });
            if in_use.contains(&image.id) {
                seen.last_used = now;
            }
        }
    }

    /// Which images to remove at `now`, given the filesystem's `usage`. `protected` holds
    /// images never to remove besides those in use (the sandbox image). Call [`observe`]
    /// first with the same listing.
    ///
    /// [`observe`]: ImageGc::observe
    pub fn plan(
        &self,
        now: Instant,
        images: &[ImageRecord],
        in_use: &HashSet<String>,
        protected: &HashSet<String>,
        usage: FsUsage,
    ) -> Plan {
        if self.policy.high_threshold_percent >= 100
            || usage.used_percent() < u64::from(self.policy.high_threshold_percent)
        {
            return Plan::default();
        }
        // Free enough to be left with (100 - low)% of the filesystem available.
        let target_available = u128::from(usage.capacity_bytes)
            * u128::from(100 - self.policy.low_threshold_percent)
            / 100;
        let wanted = target_available.saturating_sub(u128::from(usage.available_bytes)) as u64;
        if wanted == 0 {
            return Plan::default();
        }
        let mut candidates: Vec<(&ImageRecord, Seen)> = images
            .iter()
            .filter(|i| !i.pinned && !in_use.contains(&i.id) && !protected.contains(&i.id))
            .filter_map(|i| Some((i, *self.seen.get(&i.id)?)))
            .filter(|(_, seen)| now.saturating_duration_since(seen.first) >= self.policy.min_age)
            .collect();
        // Least recently used first; among equals, the one seen first.
        candidates.sort_by_key(|(i, seen)| (seen.last_used, seen.first, i.id.clone()));
        let mut plan = Plan {
            wanted_bytes: wanted,
            ..Plan::default()
        };
        for (image, _) in candidates {
            if plan.freed_bytes >= wanted {
                break;
            }
            plan.remove.push(image.id.clone());
            plan.freed_bytes += image.size_bytes;
        }
        plan
    }
}

/// The node's `status.images`: largest first, at most [`MAX_NODE_IMAGES`], each with its
/// digests and tags as `names` (kubelet's order) and `sizeBytes`. Images without a name are
/// left out.
pub fn node_images(images: &[ImageRecord]) -> Value {
    let mut named: Vec<&ImageRecord> = images
        .iter()
        .filter(|i| !i.tags.is_empty() || !i.digests.is_empty())
        .collect();
    named.sort_by(|a, b| b.size_bytes.cmp(&a.size_bytes).then(a.id.cmp(&b.id)));
    Value::Array(
        named
            .into_iter()
            .take(MAX_NODE_IMAGES)
            .map(|i| {
                let names: Vec<&String> = i.digests.iter().chain(&i.tags).collect();
                json!({"names": names, "sizeBytes": i.size_bytes})
            })
            .collect(),
    )
}

/// statvfs of `path`: the filesystem's size and what an unprivileged writer may still use.
///
/// # Errors
/// The path does not exist or its filesystem cannot be asked.
pub fn fs_usage(path: &Path) -> std::io::Result<FsUsage> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c_path is a valid NUL-terminated string and stat a writable statvfs; statvfs
    // fills it completely when it returns 0.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so the struct is initialized.
    let stat = unsafe { stat.assume_init() };
    // fsblkcnt_t and f_frsize are u64 here, u32 on some 32-bit targets.
    #[allow(clippy::useless_conversion)]
    let fragment = u64::from(stat.f_frsize);
    #[allow(clippy::useless_conversion)]
    Ok(FsUsage {
        capacity_bytes: u64::from(stat.f_blocks) * fragment,
        available_bytes: u64::from(stat.f_bavail) * fragment,
    })
}

fn record(image: cri::Image) -> ImageRecord {
    ImageRecord {
        id: image.id,
        size_bytes: image.size,
        tags: image.repo_tags,
        digests: image.repo_digests,
        pinned: image.pinned,
    }
}

/// The runtime's images, the images its containers use (any state), the sandbox image's id
/// and the image filesystem's usage.
async fn look(
    cri: &CriClient,
    sandbox_image: &mut Option<String>,
) -> Result<
    (
        Vec<ImageRecord>,
        HashSet<String>,
        HashSet<String>,
        Option<FsUsage>,
    ),
    tonic::Status,
> {
    let mut images = cri.image_service();
    let listed = images
        .list_images(call(cri::ListImagesRequest { filter: None }))
        .await?
        .into_inner()
        .images;
    let records: Vec<ImageRecord> = listed.into_iter().map(record).collect();
    let containers = cri
        .runtime_service()
        .list_containers(call(cri::ListContainersRequest { filter: None }))
        .await?
        .into_inner()
        .containers;
    let mut in_use = HashSet::new();
    for c in containers {
        in_use.insert(c.image_ref.clone());
        if let Some(spec) = c.image {
            in_use.insert(spec.image);
        }
    }
    // References by name become the ids they name.
    let by_name: HashMap<&str, &str> = records
        .iter()
        .flat_map(|r| {
            r.tags
                .iter()
                .chain(&r.digests)
                .map(move |n| (n.as_str(), r.id.as_str()))
        })
        .collect();
    let named: Vec<String> = in_use
        .iter()
        .filter_map(|n| by_name.get(n.as_str()).map(|id| (*id).to_owned()))
        .collect();
    in_use.extend(named);

    if sandbox_image.is_none() {
        *sandbox_image = sandbox_image_of(cri).await;
    }
    let mut protected = HashSet::new();
    if let Some(pause) = sandbox_image.as_deref() {
        protected.insert(pause.to_owned());
        if let Some(id) = by_name
            .get(pause)
            .or_else(|| by_name.get(format!("{pause}:latest").as_str()))
        {
            protected.insert((*id).to_owned());
        }
    }

    let fs = images
        .image_fs_info(call(cri::ImageFsInfoRequest {}))
        .await?
        .into_inner();
    let usage = fs
        .image_filesystems
        .iter()
        .find_map(|f| f.fs_id.as_ref())
        .and_then(|id| fs_usage(Path::new(&id.mountpoint)).ok());
    Ok((records, in_use, protected, usage))
}

/// The runtime's sandbox (pause) image, from its verbose status (containerd reports its CRI
/// configuration there, `sandboxImage`).
async fn sandbox_image_of(cri: &CriClient) -> Option<String> {
    let status = cri
        .runtime_service()
        .status(call(cri::StatusRequest { verbose: true }))
        .await
        .ok()?
        .into_inner();
    let config: Value = serde_json::from_str(status.info.get("config")?).ok()?;
    config["sandboxImage"].as_str().map(str::to_owned)
}

fn call<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// Collects images per `policy` and publishes the node's image list on `images` until
/// `shutdown`. A runtime that does not answer is asked again at the next period.
pub async fn run(
    cri: CriClient,
    policy: ImageGcPolicy,
    images: tokio::sync::watch::Sender<Value>,
    shutdown: CancellationToken,
) {
    let mut gc = ImageGc::new(policy);
    let mut sandbox_image = None;
    // The first pass right away: the node's image list is part of its first status.
    let mut tick = tokio::time::interval(policy.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let (mut listed, in_use, protected, usage) = match look(&cri, &mut sandbox_image).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(error = %e, "image GC: the runtime did not answer");
                continue;
            }
        };
        let now = Instant::now();
        gc.observe(now, &listed, &in_use);
        if let Some(usage) = usage {
            let plan = gc.plan(now, &listed, &in_use, &protected, usage);
            if plan.wanted_bytes > 0 {
                tracing::info!(
                    used_percent = usage.used_percent(),
                    wanted_bytes = plan.wanted_bytes,
                    images = plan.remove.len(),
                    freed_bytes = plan.freed_bytes,
                    "image GC: the image filesystem is above its high threshold"
                );
            }
            for id in &plan.remove {
                let removed = cri
                    .image_service()
                    .remove_image(call(cri::RemoveImageRequest {
                        image: Some(cri::ImageSpec {
                            image: id.clone(),
                            ..Default::default()
                        }),
                    }))
                    .await;
                match removed {
                    Ok(_) => {
                        tracing::info!(image = %id, "image GC: removed an unused image");
                        listed.retain(|i| &i.id != id);
                    }
                    Err(e) => tracing::warn!(image = %id, error = %e, "image GC: cannot remove"),
                }
            }
            if plan.wanted_bytes > 0 && plan.freed_bytes < plan.wanted_bytes {
                tracing::warn!(
                    wanted_bytes = plan.wanted_bytes,
                    freed_bytes = plan.freed_bytes,
                    "image GC: not enough unused images to get below the low threshold"
                );
            }
        }
        images.send_if_modified(|current| {
            let next = node_images(&listed);
            let changed = *current != next;
            *current = next;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, size: u64) -> ImageRecord {
        ImageRecord {
            id: id.into(),
            size_bytes: size,
            tags: vec![format!("reg/{id}:1")],
            digests: vec![],
            pinned: false,
        }
    }

    fn policy() -> ImageGcPolicy {
        ImageGcPolicy {
            high_threshold_percent: 85,
            low_threshold_percent: 80,
            min_age: Duration::from_secs(60),
            period: Duration::from_secs(300),
        }
    }

    fn set(ids: &[&str]) -> HashSet<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn below_the_high_threshold_nothing_is_removed() {
        let mut gc = ImageGc::new(policy());
        let t0 = Instant::now();
        let images = vec![image("a", 10)];
        gc.observe(t0, &images, &set(&[]));
        let usage = FsUsage {
            capacity_bytes: 100,
            available_bytes: 16,
        };
        assert_eq!(usage.used_percent(), 84);
        let plan = gc.plan(
            t0 + Duration::from_secs(600),
            &images,
            &set(&[]),
            &set(&[]),
            usage,
        );
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn least_recently_used_unused_images_go_until_the_low_threshold() {
        let mut gc = ImageGc::new(policy());
        let t0 = Instant::now();
        let images = vec![
            image("old", 3),
            image("older", 4),
            image("used", 50),
            image("young", 9),
            image("pause", 1),
        ];
        gc.observe(t0, &images[..3], &set(&["old", "older"]));
        gc.observe(t0 + Duration::from_secs(10), &images[..3], &set(&["old"]));
        let later = t0 + Duration::from_secs(100);
        gc.observe(later, &images, &set(&["used"]));
        // 90 % used; down to 80 % means 10 bytes to free.
        let usage = FsUsage {
            capacity_bytes: 100,
            available_bytes: 10,
        };
        let plan = gc.plan(later, &images, &set(&["used"]), &set(&["pause"]), usage);
        // "older" was last used before "old"; "young" is not old enough; "used" and "pause"
        // are kept whatever the need.
        assert_eq!(plan.remove, vec!["older".to_owned(), "old".to_owned()]);
        assert_eq!(plan.wanted_bytes, 10);
        assert_eq!(plan.freed_bytes, 7);
    }

    #[test]
    fn it_stops_once_enough_is_freed_and_keeps_pinned_images() {
        let mut gc = ImageGc::new(policy());
        let t0 = Instant::now();
        let mut pinned = image("pinned", 100);
        pinned.pinned = true;
        let images = vec![pinned, image("a", 20), image("b", 20)];
        gc.observe(t0, &images, &set(&[]));
        let usage = FsUsage {
            capacity_bytes: 1000,
            available_bytes: 150,
        };
        let plan = gc.plan(
            t0 + Duration::from_secs(61),
            &images,
            &set(&[]),
            &set(&[]),
            usage,
        );
        // 85 % used: free 50 to be at 80 %; both small ones are needed, the pinned one stays.
        assert_eq!(plan.remove.len(), 2);
        assert!(!plan.remove.contains(&"pinned".to_owned()));
        let usage = FsUsage {
            capacity_bytes: 1000,
            available_bytes: 185,
        };
        let plan = gc.plan(
            t0 + Duration::from_secs(61),
            &images,
            &set(&[]),
            &set(&[]),
            usage,
        );
        assert_eq!(plan, Plan::default(), "81 % is below 85 %");
    }

    #[test]
    fn forgotten_images_are_new_again_and_thresholds_are_checked() {
        let mut gc = ImageGc::new(policy());
        let t0 = Instant::now();
        gc.observe(t0, &[image("a", 1)], &set(&[]));
        gc.observe(t0 + Duration::from_secs(100), &[], &set(&[]));
        let back = t0 + Duration::from_secs(110);
        gc.observe(back, &[image("a", 1)], &set(&[]));
        let full = FsUsage {
            capacity_bytes: 10,
            available_bytes: 0,
        };
        assert!(gc
            .plan(back, &[image("a", 1)], &set(&[]), &set(&[]), full)
            .remove
            .is_empty());
        let bad = ImageGcPolicy {
            low_threshold_percent: 90,
            ..policy()
        };
        assert!(bad.validate().is_err());
        assert!(policy().validate().is_ok());
    }

    #[test]
    fn the_node_lists_its_largest_named_images_digests_first() {
        let mut images: Vec<ImageRecord> = (0..60).map(|i| image(&format!("i{i}"), i)).collect();
        images[59].digests = vec!["reg/i59@sha256:00".into()];
        images.push(ImageRecord {
            tags: vec![],
            ..image("unnamed", 1000)
        });
        let listed = node_images(&images);
        let listed = listed.as_array().unwrap();
        assert_eq!(listed.len(), MAX_NODE_IMAGES);
        assert_eq!(listed[0]["sizeBytes"], 59);
        assert_eq!(
            listed[0]["names"],
            json!(["reg/i59@sha256:00", "reg/i59:1"])
        );
    }

    #[test]
    fn statvfs_of_the_root_has_a_size() {
        let usage = fs_usage(Path::new("/")).unwrap();
        assert!(usage.capacity_bytes > 0 && usage.available_bytes <= usage.capacity_bytes);
        assert!(fs_usage(Path::new("/no/such/dir")).is_err());
    }
}
