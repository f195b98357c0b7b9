//! The directories a backend keeps its state in (its own and each
//! lease's): private, like the key files inside them.

use std::fs;
use std::path::Path;

use xe_store::secret_file::SECRET_DIR_MODE;

use crate::VmError;

/// Create `dir` (and parents) with mode 0700 for its last component.
pub(crate) fn create(dir: &Path) -> Result<(), VmError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(SECRET_DIR_MODE)
        .create(dir)
        .map_err(VmError::io(format!("creating {}", dir.display())))
}
