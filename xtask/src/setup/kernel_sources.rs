//! The Debian suites `vm-test` takes its guest kernels from, as a private
//! apt configuration: its own sources list, keyring, package lists and
//! cache in a directory of its own. It serves `apt-cache` and `apt-get
//! download` only: nothing is ever installed from these suites, and the
//! host's own sources, lists and pinning are neither used nor changed.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, ensure};

use crate::util::run_checked;

/// Where Debian's archive keys are, one keyring per release and archive,
/// from the package `debian-archive-keyring`.
const KEYRINGS: &str = "/usr/share/keyrings";

/// The package that ships [`KEYRINGS`], and the file that shows it is there.
const KEYRING_PACKAGE: (&str, &str) = (
    "/usr/share/keyrings/debian-archive-keyring.gpg",
    "debian-archive-keyring",
);

/// A suite and the keys that sign its `InRelease` file. apt accepts a
/// suite when one of the signatures is from a key in its keyring; every
/// suite has two signers, so one key missing from an older
/// debian-archive-keyring does no harm.
struct Suite {
    archive: &'static str,
    suite: &'static str,
    keys: &'static [&'static str],
}

const DEBIAN: &str = "http://deb.debian.org/debian";
const SECURITY: &str = "http://deb.debian.org/debian-security";

const SUITES: &[Suite] = &[
    // 6.1 and 6.12 (Debian 12): a point release's kernel is in bookworm,
    // a security update's in bookworm-security first.
    Suite {
        archive: DEBIAN,
        suite: "bookworm",
        keys: &[
            "debian-archive-bookworm-automatic.gpg",
            "debian-archive-trixie-automatic.gpg",
        ],
    },
    Suite {
        archive: SECURITY,
        suite: "bookworm-security",
        keys: &[
            "debian-archive-bookworm-security-automatic.gpg",
            "debian-archive-bullseye-security-automatic.gpg",
        ],
    },
    // 5.10 (Debian 11): its long-term support updates go to the security
    // archive only; bullseye itself stopped at its last point release.
    Suite {
        archive: SECURITY,
        suite: "bullseye-security",
        keys: &[
            "debian-archive-bullseye-security-automatic.gpg",
            "debian-archive-bookworm-security-automatic.gpg",
        ],
    },
    // The newest series Debian builds for Debian 13.
    Suite {
        archive: DEBIAN,
        suite: "trixie-backports",
        keys: &[
            "debian-archive-trixie-automatic.gpg",
            "debian-archive-bookworm-automatic.gpg",
        ],
    },
];

/// Package lists older than this are fetched again before a search:
/// kernel updates replace packages, and the archives drop the old ones.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The private apt configuration, ready to search and download with.
pub(crate) struct KernelSources {
    dir: PathBuf,
}

/// Writes the private configuration into `dir` (only what changed), with
/// a keyring of the archive keys that sign [`SUITES`], and fetches the
/// package lists when they are missing or older than a day. Installs
/// debian-archive-keyring when its keys are missing.
pub(crate) fn kernel_sources(dir: &Path) -> Result<KernelSources> {
    super::ensure_debian_files(&[KEYRING_PACKAGE])?;
    for sub in [
        "lists/partial",
        "cache/archives/partial",
        "sources",
        "preferences",
    ] {
        fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let keyring = dir.join("keyring.gpg");
    write_if_changed(&keyring, &keyring_bytes()?)?;
    write_if_changed(
        &dir.join("sources").join("kernels.sources"),
        sources(&keyring).as_bytes(),
    )?;
    write_if_changed(&dir.join("apt.conf"), apt_conf(dir).as_bytes())?;
    let sources = KernelSources {
        dir: dir.to_path_buf(),
    };
    if !sources.lists_fresh() {
        sources.update()?;
    }
    Ok(sources)
}

impl KernelSources {
    /// `apt-cache` or `apt-get` (`program`) on the private configuration.
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", self.dir.join("apt.conf"));
        cmd
    }

    /// Fetches the package lists of [`SUITES`].
    pub(crate) fn update(&self) -> Result<()> {
        eprintln!(
            "vm-test: fetching the package lists of {}",
            SUITES
                .iter()
                .map(|s| s.suite)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut cmd = self.command("apt-get");
        cmd.arg("update").stdout(std::io::stderr());
        run_checked(&mut cmd).context("fetching the kernel suites' package lists")?;
        fs::write(self.stamp(), "")?;
        Ok(())
    }

    fn stamp(&self) -> PathBuf {
        self.dir.join("lists").join("updated")
    }

    fn lists_fresh(&self) -> bool {
        fs::metadata(self.stamp())
            .and_then(|m| m.modified())
            .is_ok_and(|t| {
                SystemTime::now()
                    .duration_since(t)
                    .is_ok_and(|age| age < LISTS_MAX_AGE)
            })
    }
}

/// The keys that sign [`SUITES`], from debian-archive-keyring's per-release
/// keyrings, concatenated (a binary OpenPGP keyring is a sequence of key
/// packets). Fails when a suite would have none of its signers.
fn keyring_bytes() -> Result<Vec<u8>> {
    let mut names: Vec<&str> = SUITES.iter().flat_map(|s| s.keys.iter().copied()).collect();
    names.sort_unstable();
    names.dedup();
    let present: Vec<&str> = names
        .into_iter()
        .filter(|n| Path::new(KEYRINGS).join(n).is_file())
        .collect();
    for suite in SUITES {
        ensure!(
            suite.keys.iter().any(|k| present.contains(k)),
            "none of the keys that sign {} ({}) is in {KEYRINGS}; a newer \
             debian-archive-keyring package has them",
            suite.suite,
            suite.keys.join(", ")
        );
    }
    let mut bytes = Vec::new();
    for name in present {
        let path = Path::new(KEYRINGS).join(name);
        bytes.extend(fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
    }
    Ok(bytes)
}

/// The sources in deb822 form: amd64 package lists only (no translations,
/// no AppStream metadata), checked against the private keyring alone.
fn sources(keyring: &Path) -> String {
    SUITES
        .iter()
        .map(|s| {
            format!(
                "Types: deb\nURIs: {}\nSuites: {}\nComponents: main\nArchitectures: amd64\n\
                 Targets: Packages\nSigned-By: {}\n",
                s.archive,
                s.suite,
                keyring.display()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Points apt at the private files only. The host's apt.conf.d (proxies)
/// still applies; its sources, package lists, cache, pinning and dpkg
/// status do not (an empty status: nothing counts as installed).
fn apt_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "Dir::Etc::SourceList \"/dev/null\";\n\
         Dir::Etc::SourceParts \"{d}/sources\";\n\
         Dir::Etc::Preferences \"/dev/null\";\n\
         Dir::Etc::PreferencesParts \"{d}/preferences\";\n\
         Dir::State::Lists \"{d}/lists\";\n\
         Dir::State::Status \"/dev/null\";\n\
         Dir::Cache \"{d}/cache\";\n\
         // Downloads go to a root-owned directory: no sandbox user.\n\
         APT::Sandbox::User \"root\";\n"
    )
}

fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<()> {
    if fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_deb822_stanzas() {
        let text = sources(Path::new("/k.gpg"));
        assert_eq!(text.matches("Types: deb\n").count(), SUITES.len());
        assert!(
            text.contains(
                "URIs: http://deb.debian.org/debian-security\nSuites: bullseye-security\n"
            )
        );
        assert!(text.contains("Suites: trixie-backports\n"));
        assert!(text.contains("\n\nTypes: deb\n"));
    }
}
