//! The container and the Kubernetes pod a cgroup path shows: on a node,
//! people search by container and pod, not by cgroup path. Only the path is
//! read: the layouts of the container runtimes and of the kubelet's two
//! cgroup drivers name them.
//!
//! - kubelet, systemd driver:
//!   `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`
//!   (`crio-<id>.scope`, `docker-<id>.scope`), the pod uid with `_` for `-`;
//! - kubelet, cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>`;
//! - Docker and podman: `docker-<id>.scope`, `libpod-<id>.scope`, or
//!   `/docker/<id>` with the cgroupfs driver;
//! - systemd-nspawn: `machine.slice/systemd-nspawn@<name>.service` or
//!   `machine.slice/machine-<name>.scope` (the container id is the machine's
//!   name: nspawn has no 64-hex id).

/// A container id and pod uid, as far as the path shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ContainerIdentity {
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
}

/// The container and pod of the cgroup at `path` (relative to its
/// hierarchy's mount), from its last container-looking component and the
/// pod component above it.
pub(crate) fn identify(path: &str) -> ContainerIdentity {
    let mut id = ContainerIdentity::default();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        if let Some(uid) = pod_uid(part) {
            id.pod_uid = Some(uid);
        } else if let Some(container) = container_id(part) {
            id.container_id = Some(container);
        }
    }
    id
}

/// `kubepods-<qos>-pod<uid>.slice` / `kubepods-pod<uid>.slice` (systemd
/// driver, `_` for `-`) or `pod<uid>` (cgroupfs driver).
fn pod_uid(part: &str) -> Option<String> {
    let uid = match part.strip_suffix(".slice") {
        Some(slice) => slice
            .strip_prefix("kubepods-")?
            .rsplit_once("pod")
            .map(|(_, uid)| uid.replace('_', "-"))?,
        None => part.strip_prefix("pod")?.to_owned(),
    };
    is_uid(&uid).then_some(uid)
}

/// A runtime's scope (`<runtime>-<id>.scope`), a bare 64-hex directory
/// (cgroupfs drivers), or an nspawn machine.
fn container_id(part: &str) -> Option<String> {
    if let Some(scope) = part.strip_suffix(".scope") {
        if let Some(name) = scope.strip_prefix("machine-") {
            // systemd escapes '-' in machine names as \x2d.
            return Some(name.replace("\\x2d", "-"));
        }
        let (_, id) = scope.rsplit_once('-')?;
        return is_hex_id(id).then(|| id.to_owned());
    }
    if let Some(name) = part
        .strip_prefix("systemd-nspawn@")
        .and_then(|p| p.strip_suffix(".service"))
    {
        return Some(name.replace("\\x2d", "-"));
    }
    is_hex_id(part).then(|| part.to_owned())
}

fn is_hex_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A pod uid: a UUID, 36 characters of hex and dashes.
fn is_uid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| {
            matches!(i, 8 | 13 | 18 | 23) == (b == b'-') && (b == b'-' || b.is_ascii_hexdigit())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c2a7b9d0e4f5a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c";
    const UID: &str = "8c0a5b2e-1f3d-4e6a-9b7c-2d4e6f8a0b1c";

    fn both(path: &str) -> ContainerIdentity {
        identify(path)
    }

    #[test]
    fn kubelet_systemd_driver() {
        let uid_ = UID.replace('-', "_");
        for runtime in ["cri-containerd", "crio", "docker"] {
            for qos in ["kubepods-burstable-", "kubepods-besteffort-", "kubepods-"] {
                let parent = match qos {
                    "kubepods-" => "kubepods.slice".to_owned(),
                    q => format!("kubepods.slice/{}.slice", q.trim_end_matches('-')),
                };
                let path = format!("/{parent}/{qos}pod{uid_}.slice/{runtime}-{ID}.scope");
                assert_eq!(
                    both(&path),
                    ContainerIdentity {
                        container_id: Some(ID.to_owned()),
                        pod_uid: Some(UID.to_owned()),
                    },
                    "{path}"
                );
            }
        }
    }

    #[test]
    fn kubelet_cgroupfs_driver() {
        for path in [
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            format!("/kubepods/pod{UID}/{ID}"),
        ] {
            assert_eq!(
                both(&path),
                ContainerIdentity {
                    container_id: Some(ID.to_owned()),
                    pod_uid: Some(UID.to_owned()),
                },
                "{path}"
            );
        }
        // The pod's own cgroup: a pod, no container yet.
        assert_eq!(
            both(&format!("/kubepods/besteffort/pod{UID}")),
            ContainerIdentity {
                container_id: None,
                pod_uid: Some(UID.to_owned()),
            }
        );
    }

    #[test]
    fn docker_podman_and_nspawn() {
        for path in [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/machine.slice/libpod-{ID}.scope"),
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"),
            format!("/docker/{ID}"),
        ] {
            assert_eq!(both(&path).container_id.as_deref(), Some(ID), "{path}");
            assert_eq!(both(&path).pod_uid, None, "{path}");
        }
        assert_eq!(
            both("/machine.slice/systemd-nspawn@web\\x2d1.service")
                .container_id
                .as_deref(),
            Some("web-1")
        );
        assert_eq!(
            both("/machine.slice/machine-web\\x2d1.scope")
                .container_id
                .as_deref(),
            Some("web-1")
        );
    }

    #[test]
    fn ordinary_cgroups_show_nothing() {
        for path in [
            "/",
            "/user.slice/user-1000.slice/session-3.scope",
            "/system.slice/sshd.service",
            "/kubepods.slice",
            "/kubepods/burstable",
            "/kdiag-test-1234",
            "/system.slice/docker-short.scope",
            "/podcast",
        ] {
            assert_eq!(both(path), ContainerIdentity::default(), "{path}");
        }
    }
}
