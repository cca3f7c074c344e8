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
use crate::{
    setup::KernelSources,
    util::{describe, run_checked},
};

/// A kernel series the matrix covers and how Debian names its packages:
/// `<prefix><N><suffix>`, where N is a number or dotted numbers, and newer
/// packages have a larger N. The generic `amd64` flavour: the `cloud` one
/// has no 9p, which the guest needs.
pub(super) struct Series {
    /// What `--kernel` calls it: the series itself (`6.1`), or `newest`.
    pub name: &'static str,
    prefix: &'static str,
    suffix: &'static str,
    /// The series is whatever the newest package is (its N's first two
    /// numbers), not `name`.
    moving: bool,
    /// Where Debian publishes it (setup's kernel sources), for messages.
    suites: &'static str,
}

pub(super) const SERIES: &[Series] = &[
    // Debian 11's kernel: its long-term support updates.
    Series {
        name: "5.10",
        prefix: "linux-image-5.10.0-",
        suffix: "-amd64-unsigned",
        moving: false,
        suites: "bullseye-security",
    },
    // Debian 12's own kernel.
    Series {
        name: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
        moving: false,
        suites: "bookworm and bookworm-security",
    },
    // The 6.12 kernel Debian 12 ships for newer hardware.
    Series {
        name: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
        moving: false,
        suites: "bookworm and bookworm-security",
    },
    // The newest series Debian builds for Debian 13 (7.3 at the time of
    // writing). Since 6.19 the package is signed and holds nothing itself:
    // it depends on its parts (kernel image, modules, base files), which
    // `Pick::parts` adds.
    Series {
        name: "newest",
        prefix: "linux-image-",
        suffix: "+deb13-amd64",
        moving: true,
        suites: "trixie-backports",
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

/// The package a series resolved to.
pub(super) struct Pick {
    /// The kernel series, e.g. `6.1`, or `7.3` for `newest`.
    pub series: String,
    pub package: String,
    pub version: String,
}

impl Series {
    /// The series names of the fixed series, which stay the same from run
    /// to run.
    pub(super) fn fixed_names() -> impl Iterator<Item = &'static str> {
        SERIES.iter().filter(|s| !s.moving).map(|s| s.name)
    }

    pub(super) fn moving(&self) -> bool {
        self.moving
    }

    /// The newest package of this series the kernel sources offer. Fetches
    /// the package lists again once when nothing matches.
    pub(super) fn newest_package(&self, apt: &KernelSources) -> Result<Pick> {
        if let Some(found) = self.search(apt)? {
            return Ok(found);
        }
        eprintln!(
            "vm-test: no {} package known to apt; fetching the package lists again",
            self.pattern()
        );
        apt.update()?;
        self.search(apt)?.with_context(|| {
            format!(
                "no package matching {} with a downloadable version in {} (see `APT_CONFIG=... \
                 apt-cache policy`)",
                self.pattern(),
                self.suites
            )
        })
    }

    fn pattern(&self) -> String {
        format!(
            "^{}[0-9]+(\\.[0-9]+)*{}$",
            regex_escape(self.prefix),
            regex_escape(self.suffix)
        )
    }

    /// N of a package name, as numbers: `[56]`, `[7, 3, 4]`.
    fn number(&self, package: &str) -> Option<Vec<u32>> {
        let n = package
            .strip_prefix(self.prefix)?
            .strip_suffix(self.suffix)?;
        n.split('.').map(|part| part.parse().ok()).collect()
    }

    /// The package with the largest N that has a candidate version.
    fn search(&self, apt: &KernelSources) -> Result<Option<Pick>> {
        let names =
            output(
                apt.command("apt-cache")
                    .args(["search", "--names-only", &self.pattern()]),
            )?;
        let mut packages: Vec<(Vec<u32>, String)> = names
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter_map(|name| Some((self.number(name)?, name.to_owned())))
            .collect();
        packages.sort_unstable_by(|a, b| b.cmp(a));
        for (number, package) in packages {
            if let Some(version) = candidate(apt, &package)? {
                let series = if self.moving {
                    number
                        .iter()
                        .take(2)
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(".")
                } else {
                    self.name.to_owned()
                };
                return Ok(Some(Pick {
                    series,
                    package,
                    version,
                }));
            }
        }
        Ok(None)
    }
}

impl Pick {
    /// The package and the packages of the same version it depends on
    /// exactly: the parts a split kernel package is made of
    /// (`linux-binary-*`, `linux-modules-*`, `linux-base-*`). An older,
    /// whole package has none.
    pub(super) fn parts(&self, apt: &KernelSources) -> Result<Vec<String>> {
        let record = output(
            apt.command("apt-cache")
                .arg("show")
                .arg(format!("{}={}", self.package, self.version)),
        )?;
        let mut parts = vec![self.package.clone()];
        parts.extend(exact_depends(&record, &self.version));
        Ok(parts)
    }
}

/// The packages the `Depends:` field of an apt-cache record requires at
/// exactly `version` (`name (= version)`, no alternatives).
fn exact_depends(record: &str, version: &str) -> Vec<String> {
    let Some(depends) = record
        .lines()
        .find_map(|line| line.strip_prefix("Depends:"))
    else {
        return Vec::new();
    };
    let exact = format!("(= {version})");
    depends
        .split(',')
        .map(str::trim)
        .filter(|dep| !dep.contains('|'))
        .filter_map(|dep| {
            let (name, constraint) = dep.split_once(' ')?;
            (constraint.trim() == exact).then(|| name.to_owned())
        })
        .collect()
}

/// The version `apt-get download` would fetch, from `apt-cache policy`.
fn candidate(apt: &KernelSources, package: &str) -> Result<Option<String>> {
    let policy = output(apt.command("apt-cache").args(["policy", package]))?;
    Ok(policy
        .lines()
        .find_map(|line| line.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| *v != "(none)")
        .map(str::to_owned))
}

/// Downloads and unpacks `pick` and its parts into `cache` (once), and
/// builds the initramfs (again whenever its inputs change).
pub(super) fn prepare(
    cache: &Path,
    apt: &KernelSources,
    pick: &Pick,
    busybox: &Path,
) -> Result<Kernel> {
    let (package, version) = (&pick.package, &pick.version);
    let dir = cache.join(format!("{package}_{version}"));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let debs = download(apt, &dir, &pick.parts(apt)?, version)?;
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
        eprintln!("vm-test: unpacking {package} {version} and building its initramfs");
        let tree = dir.join("tree");
        let _ = fs::remove_dir_all(&tree);
        for deb in &debs {
            let mut extract = Command::new("dpkg-deb");
            extract.arg("-x").arg(deb).arg(&tree);
            run_checked(&mut extract)?;
        }
        let modules_root = modules_root(&tree)?;
        let release = only_entry(&modules_root)?;
        let modules_dir = modules_root.join(&release);
        // /boot/vmlinuz-<release>; split packages (6.19 on) keep it with the
        // modules.
        let image = [
            tree.join(format!("boot/vmlinuz-{release}")),
            modules_dir.join("vmlinuz"),
        ]
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("no vmlinuz for {release} in {package} or its parts"))?;
        fs::copy(&image, &vmlinuz).context("copying vmlinuz out of the package")?;
        let modules = modules::resolve(&modules_dir, initramfs::MODULES)?;
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

/// `lib/modules` of an unpacked package, or `usr/lib/modules` where
/// the package follows Debian 13's merged /usr.
fn modules_root(tree: &Path) -> Result<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| tree.join(d))
        .find(|d| d.is_dir())
        .with_context(|| format!("no lib/modules or usr/lib/modules in {}", tree.display()))
}

/// The files of `packages` (all of `version`) in `dir`, downloading with
/// `apt-get download` those that are not there yet.
fn download(
    apt: &KernelSources,
    dir: &Path,
    packages: &[String],
    version: &str,
) -> Result<Vec<PathBuf>> {
    // apt writes `:` of epochs as `%3a` in file names; Debian's kernel
    // packages have no epoch, so the names are predictable.
    let debs: Vec<PathBuf> = packages
        .iter()
        .map(|p| dir.join(format!("{p}_{version}_amd64.deb")))
        .collect();
    let missing: Vec<String> = packages
        .iter()
        .zip(&debs)
        .filter(|(_, deb)| !deb.is_file())
        .map(|(p, _)| format!("{p}={version}"))
        .collect();
    if missing.is_empty() {
        return Ok(debs);
    }
    eprintln!("vm-test: downloading {}", missing.join(" "));
    let mut cmd = apt.command("apt-get");
    cmd.current_dir(dir)
        .arg("download")
        .args(&missing)
        .stdout(std::io::stderr());
    run_checked(&mut cmd)?;
    for deb in &debs {
        ensure!(
            deb.is_file(),
            "`{}` succeeded but {} is not there",
            describe(&cmd),
            deb.display()
        );
    }
    Ok(debs)
}

/// What the initramfs is built from besides the kernel package: when any of
/// it changes, the cached archive is rebuilt.
fn input_hash(busybox: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    initramfs::INIT.hash(&mut hasher);
    initramfs::MODULES.hash(&mut hasher);
    modules::SOFT_DEPS.hash(&mut hasher);
    busybox.hash(&mut hasher);
    hasher.finish()
}

/// The single directory entry of `dir` (a package's `<release>` under
/// `lib/modules`).
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

    fn series(name: &str) -> &'static Series {
        SERIES.iter().find(|s| s.name == name).unwrap()
    }

    #[test]
    fn patterns_match_debian_names() {
        assert_eq!(
            series("6.12").pattern(),
            r"^linux-image-6\.12\.[0-9]+(\.[0-9]+)*\+deb12-amd64-unsigned$"
        );
        assert_eq!(
            series("6.1").pattern(),
            r"^linux-image-6\.1\.0-[0-9]+(\.[0-9]+)*-amd64-unsigned$"
        );
        let s510 = series("5.10");
        assert_eq!(
            s510.number("linux-image-5.10.0-46-amd64-unsigned"),
            Some(vec![46])
        );
        assert_eq!(
            s510.number("linux-image-5.10.0-46-cloud-amd64-unsigned"),
            None
        );
        let newest = series("newest");
        assert_eq!(
            newest.number("linux-image-7.3.4+deb13-amd64"),
            Some(vec![7, 3, 4])
        );
        assert_eq!(newest.number("linux-image-7.3.4+deb13-rt-amd64"), None);
        assert_eq!(newest.number("linux-image-7.3.4+deb13-amd64-dbg"), None);
        // Numeric, not textual: 6.19 is older than 7.0, 7.10 newer than 7.9.
        assert!(
            newest.number("linux-image-7.10.1+deb13-amd64")
                > newest.number("linux-image-7.9.12+deb13-amd64")
        );
    }

    #[test]
    fn split_packages_name_their_parts() {
        let record = "Package: linux-image-7.3.4+deb13-amd64\n\
                      Version: 7.3.4-1~bpo13+1\n\
                      Depends: dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, \
                      linux-base-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), \
                      linux-binary-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1), \
                      linux-modules-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)\n";
        assert_eq!(
            exact_depends(record, "7.3.4-1~bpo13+1"),
            [
                "linux-base-7.3.4+deb13-amd64",
                "linux-binary-7.3.4+deb13-amd64",
                "linux-modules-7.3.4+deb13-amd64"
            ]
        );
        let whole = "Package: linux-image-5.10.0-46-amd64-unsigned\n\
                     Depends: kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool\n";
        assert!(exact_depends(whole, "5.10.262-1").is_empty());
    }
}
