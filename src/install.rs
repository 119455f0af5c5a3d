//! Where the Debian package puts cras's files, found from the running binary: a package
//! installed as `/usr/bin/cras` finds `/usr/share/cras/...` and `/usr/lib/cras/...`; the
//! same tree unpacked under another root (a scratch root, `/opt/cras`) finds its own.

use std::path::PathBuf;

/// `<prefix>/<rel>` for the prefix the binary runs from (`/usr` for `/usr/bin/cras`),
/// else `/usr/<rel>`.
pub fn packaged(rel: &str) -> PathBuf {
    let beside_binary = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join(rel)))
        .filter(|p| p.exists());
    beside_binary.unwrap_or_else(|| PathBuf::from("/usr").join(rel))
}

#[cfg(test)]
mod tests {
    #[test]
    fn falls_back_to_usr() {
        // The test binary runs from target/*/deps: no share/cras beside it.
        assert_eq!(
            super::packaged("share/cras/no-such-thing"),
            std::path::PathBuf::from("/usr/share/cras/no-such-thing")
        );
    }
}
