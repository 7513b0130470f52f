//! Layout tarballs are unpacked within bounds: a small gzip declaring more entries
//! than a layout ever has is refused before it fills the disk (found while writing the
//! `oci_layout` fuzz target: `push_layout` unpacked whatever the tarball held).

use br2k_core::{Error, Repository};
use br2k_oci::OciImageStore;

/// A gzip tarball of `n` empty files (a few hundred KiB for 10,001).
fn many_files(n: u64) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    let gz = flate2::write::GzEncoder::new(file.reopen().unwrap(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for i in 0..n {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append_data(&mut h, format!("f/{i}"), std::io::empty())
            .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    file
}

#[tokio::test]
async fn a_tarball_with_more_entries_than_a_layout_has_is_refused() {
    let tarball = many_files(br2k_oci::MAX_LAYOUT_ENTRIES + 1);
    // No registry is reached: the tarball is refused while it is unpacked.
    let store = OciImageStore::insecure("127.0.0.1:9").unwrap();
    let repo = Repository::new("caps/layout").unwrap();
    let err = store
        .push_layout(tarball.path(), &repo, Some("v1"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput(_)) && err.to_string().contains("entries"),
        "{err}"
    );
}
