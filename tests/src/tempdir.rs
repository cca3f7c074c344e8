//! Temporary directories, removed in Drop.
//!
//! Each is a new directory with a name no other directory had (the call
//! fails rather than reuse one), so concurrent test processes and leftovers
//! of killed runs never share or hand over a directory. It is created with
//! mode 0700 and only then given its final mode, so that whatever umask the
//! tests run with, no other user can place anything in it meanwhile.

use std::fs::{self, DirBuilder, Permissions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A directory of this test process, removed with its contents in Drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A new directory in the system's temporary directory (`TMPDIR`, else
    /// /tmp) with mode 0700; `tag` goes into its name.
    pub fn new(tag: &str) -> TempDir {
        let base = std::env::temp_dir();
        TempDir::create_in(&base, tag, 0o700)
            .unwrap_or_else(|e| panic!("creating a directory in {}: {e}", base.display()))
    }

    /// A new directory in `base` with mode `mode`, or the error that
    /// prevented it (e.g. `base` is read-only).
    pub fn create_in(base: &Path, tag: &str, mode: u32) -> std::io::Result<TempDir> {
        let pid = std::process::id();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = base.join(format!("kdt-{tag}-{pid}-{nanos:x}-{n}"));
            match DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    // From here on Drop removes it, also if the chmod fails.
                    let dir = TempDir { path };
                    fs::set_permissions(&dir.path, Permissions::from_mode(mode))?;
                    return Ok(dir);
                }
                // Someone else's, or left over from a killed run: never
                // touched, the next name is tried.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // No panic here: Drop may run while a test is already unwinding.
        match fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => eprintln!("cleanup: removing {}: {e}", self.path.display()),
        }
    }
}
