//! Debian kernels for the guest: the newest package of a series in the
//! configured apt sources, downloaded (never installed on the host) and
//! unpacked into a cache, with the initramfs built for it.

use std::{
    collections::hash_map::DefaultHasher,
    fs,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};

use super::{initramfs, modules};
use crate::util::{describe, run_checked};

/// A kernel series the matrix covers and how Debian names its packages:
/// `<prefix><N><suffix>`, newer packages having a larger N. The generic
/// `amd64` flavour: the `cloud` one has no 9p, which the guest needs.
pub(super) struct Series {
    pub name: &'static str,
    prefix: &'static str,
    suffix: &'static str,
}

pub(super) const SERIES: &[Series] = &[
    // Debian 12's own kernel (bookworm, bookworm-security).
    Series {
        name: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
    },
    // The 6.12 kernel Debian 12 ships for newer hardware (bookworm-security,
    // bookworm-backports).
    Series {
        name: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
    },
];

/// A kernel ready to boot.
pub(super) struct Kernel {
    /// Debian package and version, e.g. `linux-image-6.1.0-56-amd64-unsigned`
    /// `6.1.192-2`.
    pub package: String,
    pub version: String,
    /// `uname -r` of the guest.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub initramfs: PathBuf,
}

impl Series {
    /// The newest package of this series the configured apt sources offer.
    /// Runs `apt-get update` once when nothing matches (a fresh machine's
    /// package lists may be empty).
    pub(super) fn newest_package(&self) -> Result<(String, String)> {
        if let Some(found) = self.search()? {
            return Ok(found);
        }
        eprintln!(
            "vm-test: no {} package known to apt; running apt-get update",
            self.pattern()
        );
        let mut update = Command::new("apt-get");
        update.arg("update").stdout(std::io::stderr());
        run_checked(&mut update)?;
        self.search()?.with_context(|| {
            format!(
                "no package matching {} with an installable version in the configured apt \
                 sources (see `apt-cache policy`); Debian publishes the {} kernels in \
                 bookworm-security and bookworm-backports",
                self.pattern(),
                self.name
            )
        })
    }

    fn pattern(&self) -> String {
        format!(
            "^{}[0-9]+{}$",
            regex_escape(self.prefix),
            regex_escape(self.suffix)
        )
    }

    /// (package, candidate version) with the largest N that has a candidate.
    fn search(&self) -> Result<Option<(String, String)>> {
        let names =
            output(Command::new("apt-cache").args(["search", "--names-only", &self.pattern()]))?;
        let mut packages: Vec<(u32, String)> = names
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter_map(|name| {
                let n = name.strip_prefix(self.prefix)?.strip_suffix(self.suffix)?;
                Some((n.parse().ok()?, name.to_owned()))
            })
            .collect();
        packages.sort_unstable_by(|a, b| b.cmp(a));
        for (_, package) in packages {
            if let Some(version) = candidate(&package)? {
                return Ok(Some((package, version)));
            }
        }
        Ok(None)
    }
}

/// The version `apt-get download` would fetch, from `apt-cache policy`.
fn candidate(package: &str) -> Result<Option<String>> {
    let policy = output(Command::new("apt-cache").args(["policy", package]))?;
    Ok(policy
        .lines()
        .find_map(|line| line.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| *v != "(none)")
        .map(str::to_owned))
}

/// Downloads and unpacks `package` into `cache` (once), and builds the
/// initramfs (again whenever its inputs change).
pub(super) fn prepare(
    cache: &Path,
    package: &str,
    version: &str,
    busybox: &Path,
) -> Result<Kernel> {
    let dir = cache.join(format!("{package}_{version}"));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let deb = download(&dir, package, version)?;
    let vmlinuz = dir.join("vmlinuz");
    let release_file = dir.join("release");
    let initramfs = dir.join("initramfs.cpio");
    let key_file = dir.join("initramfs.key");
    let busybox_bytes =
        fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let key = format!("{:016x}", input_hash(&busybox_bytes));
    let fresh = vmlinuz.is_file()
        && release_file.is_file()
        && initramfs.is_file()
        && fs::read_to_string(&key_file).is_ok_and(|k| k == key);
    if !fresh {
        eprintln!(
            "vm-test: unpacking {} and building its initramfs",
            deb.display()
        );
        let tree = dir.join("tree");
        let _ = fs::remove_dir_all(&tree);
        let mut extract = Command::new("dpkg-deb");
        extract.arg("-x").arg(&deb).arg(&tree);
        run_checked(&mut extract)?;
        let release = only_entry(&tree.join("lib/modules"))?;
        fs::copy(tree.join(format!("boot/vmlinuz-{release}")), &vmlinuz)
            .context("copying vmlinuz out of the package")?;
        let modules =
            modules::resolve(&tree.join("lib/modules").join(&release), initramfs::MODULES)?;
        let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
        eprintln!("vm-test: {release}: modules {}", names.join(" "));
        fs::write(&initramfs, initramfs::build(busybox, &modules)?)?;
        fs::write(&release_file, &release)?;
        fs::write(&key_file, &key)?;
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    Ok(Kernel {
        package: package.to_owned(),
        version: version.to_owned(),
        release: fs::read_to_string(&release_file)?.trim().to_owned(),
        vmlinuz,
        initramfs,
    })
}

/// The package file in `dir`, downloaded with `apt-get download` unless it
/// is already there.
fn download(dir: &Path, package: &str, version: &str) -> Result<PathBuf> {
    // apt writes `:` of epochs as `%3a` in file names; Debian's kernel
    // packages have no epoch, so the name is predictable.
    let deb = dir.join(format!("{package}_{version}_amd64.deb"));
    if deb.is_file() {
        return Ok(deb);
    }
    eprintln!("vm-test: downloading {package} {version}");
    let mut cmd = Command::new("apt-get");
    cmd.current_dir(dir)
        // Downloading into a root-owned directory: apt would warn that its
        // sandbox user cannot write there.
        .args(["-o", "APT::Sandbox::User=root", "download"])
        .arg(format!("{package}={version}"))
        .stdout(std::io::stderr());
    run_checked(&mut cmd)?;
    ensure!(
        deb.is_file(),
        "`{}` succeeded but {} is not there",
        describe(&cmd),
        deb.display()
    );
    Ok(deb)
}

/// What the initramfs is built from besides the kernel package: when any of
/// it changes, the cached archive is rebuilt.
fn input_hash(busybox: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    initramfs::INIT.hash(&mut hasher);
    initramfs::MODULES.hash(&mut hasher);
    busybox.hash(&mut hasher);
    hasher.finish()
}

/// The single directory entry of `dir` (a package's `lib/modules/<release>`).
fn only_entry(dir: &Path) -> Result<String> {
    let entries: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    match entries.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one kernel release in {}, found {entries:?}",
            dir.display()
        ),
    }
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not run `{}`", describe(cmd)))?;
    ensure!(
        out.status.success(),
        "`{}` failed ({}): {}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = ".+*?()[]{}|^$\\".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_debian_names() {
        assert_eq!(
            SERIES[1].pattern(),
            r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$"
        );
        assert_eq!(
            SERIES[0].pattern(),
            r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$"
        );
    }
}
