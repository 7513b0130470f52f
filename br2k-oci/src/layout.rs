//! OCI image layouts (directories and tarballs): push them to a registry, write them.

use std::path::{Path, PathBuf};

use br2k_core::artifact::{MAX_MANIFEST_BYTES, OCI_INDEX};
use br2k_core::{Digest, Error, Image, ImageRef, Repository, Result, ValidationError};
use bytes::Bytes;
use serde_json::json;

use crate::error::OciError;
use crate::index::{ImageIndex, IndexEntry, ManifestDoc, parse_manifest_doc};
use crate::store::OciImageStore;

/// Annotation naming a tag in a layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| OciError::Io { what, source }.into()
}

fn blob_path(dir: &Path, d: &Digest) -> PathBuf {
    dir.join("blobs").join("sha256").join(d.hex())
}

/// Writes `image` as an OCI image layout directory at `dir`, tagged `tag`.
pub fn write_layout(image: &Image, dir: &Path, tag: Option<&str>) -> Result<()> {
    let blobs = dir.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).map_err(io(format!("create {}", blobs.display())))?;
    let write = |d: &Digest, data: &[u8]| {
        let p = blob_path(dir, d);
        std::fs::write(&p, data).map_err(io(format!("write {}", p.display())))
    };
    write(&image.digest, &image.manifest_bytes)?;
    write(&image.config.digest, &image.config.data)?;
    for l in &image.layers {
        write(&l.digest, &l.data)?;
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(io("write oci-layout"))?;
    let mut entry = json!({
        "mediaType": image.manifest.media_type.as_deref().unwrap_or(br2k_core::artifact::OCI_MANIFEST),
        "digest": image.digest.to_string(),
        "size": image.manifest_bytes.len(),
    });
    if let Some(t) = tag {
        entry["annotations"] = json!({ REF_NAME: t });
    }
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]});
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&index).expect("json"),
    )
    .map_err(io("write index.json"))
}

impl OciImageStore {
    /// Pushes the image of an OCI image layout (a directory, or a tar / tar.gz of one)
    /// to `repo`, streaming blobs from disk with their digests checked on the way.
    ///
    /// The layout's `index.json` must list one manifest, or name `tag` in a
    /// `org.opencontainers.image.ref.name` annotation. The image is tagged `tag`, or the
    /// layout's own tag when `tag` is `None`. Returns the pushed manifest (or index)
    /// digest.
    pub async fn push_layout(
        &self,
        path: impl AsRef<Path>,
        repo: &Repository,
        tag: Option<&str>,
    ) -> Result<Digest> {
        let path = path.as_ref();
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(io(format!("layout {}", path.display())))?;
        if meta.is_dir() {
            return self.push_layout_dir(path, repo, tag).await;
        }
        let tmp = tempfile::tempdir().map_err(io("temporary directory"))?;
        let (src, dst) = (path.to_owned(), tmp.path().to_owned());
        tokio::task::spawn_blocking(move || unpack(&src, &dst))
            .await
            .map_err(|e| Error::backend("oci", e, false))??;
        self.push_layout_dir(tmp.path(), repo, tag).await
    }

    async fn push_layout_dir(
        &self,
        dir: &Path,
        repo: &Repository,
        tag: Option<&str>,
    ) -> Result<Digest> {
        if let Some(t) = tag {
            ImageRef::new(self.config().registry(), repo.clone(), Some(t), None)?;
        }
        let index_bytes = read_small(&dir.join("index.json")).await?;
        let index = ImageIndex::parse(&index_bytes)?;
        let tagged = |e: &&IndexEntry| {
            e.annotations
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .is_some_and(|n| Some(n.as_str()) == tag)
        };
        let entry = match (index.manifests.len(), index.manifests.iter().find(tagged)) {
            (_, Some(e)) => e,
            (1, None) => &index.manifests[0],
            (n, None) => {
                return Err(ValidationError::malformed(
                    "image layout",
                    format!("index.json lists {n} manifests and none is tagged {tag:?}"),
                )
                .into());
            }
        };
        let layout_tag = entry
            .annotations
            .as_ref()
            .and_then(|a| a.get(REF_NAME))
            .filter(|t| {
                ImageRef::new(self.config().registry(), repo.clone(), Some(t), None).is_ok()
            })
            .cloned();
        let digest = self.push_layout_entry(dir, repo, entry).await?;
        let tag = tag.map(str::to_owned).or(layout_tag);
        if let Some(t) = tag {
            let bytes = read_small(&blob_path(dir, &digest)).await?;
            self.put_manifest_bytes(repo, bytes, Some(&t)).await?;
        }
        Ok(digest)
    }

    fn push_layout_entry<'a>(
        &'a self,
        dir: &'a Path,
        repo: &'a Repository,
        entry: &'a IndexEntry,
    ) -> futures::future::BoxFuture<'a, Result<Digest>> {
        Box::pin(async move {
            let bytes = read_small(&blob_path(dir, &entry.digest)).await?;
            entry
                .digest
                .verify(format!("layout manifest {}", entry.digest), &bytes)?;
            match parse_manifest_doc(&bytes, Some(&entry.media_type))? {
                ManifestDoc::Index(idx) => {
                    for child in &idx.manifests {
                        self.push_layout_entry(dir, repo, child).await?;
                    }
                }
                ManifestDoc::Image(m) => {
                    for d in std::iter::once(&m.config).chain(&m.layers) {
                        let p = blob_path(dir, &d.digest);
                        let file = tokio::fs::File::open(&p)
                            .await
                            .map_err(io(format!("layout blob {}", p.display())))?;
                        let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
                        self.upload_stream(repo, d, stream, format!("layout blob {}", d.digest))
                            .await?;
                    }
                }
            }
            self.put_manifest_bytes(repo, bytes, None).await
        })
    }
}

async fn read_small(path: &Path) -> Result<Bytes> {
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(io(format!("{}", path.display())))?;
    if meta.len() > MAX_MANIFEST_BYTES as u64 {
        return Err(ValidationError::malformed(
            "image layout",
            format!(
                "{} is larger than {MAX_MANIFEST_BYTES} bytes",
                path.display()
            ),
        )
        .into());
    }
    tokio::fs::read(path)
        .await
        .map(Bytes::from)
        .map_err(io(format!("{}", path.display())))
}

/// Most entries a layout tarball may hold (a layout has a few files per image).
pub const MAX_LAYOUT_ENTRIES: u64 = 10_000;

/// Most bytes a layout tarball may unpack to (the sum of its files' sizes).
pub const MAX_LAYOUT_BYTES: u64 = 32 << 30;

/// Unpacks a layout tarball into `dst`, within [`MAX_LAYOUT_ENTRIES`] and
/// [`MAX_LAYOUT_BYTES`] (a small gzip can declare far more), keeping only files and
/// directories (links, devices and sparse files are no part of a layout).
pub(crate) fn unpack(src: &Path, dst: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(src).map_err(io(format!("layout {}", src.display())))?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(io("read layout"))?;
    let f = std::fs::File::open(src).map_err(io(format!("layout {}", src.display())))?;
    let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let bad = |e: &dyn std::fmt::Display| -> Error {
        ValidationError::malformed("image layout tarball", e.to_string()).into()
    };
    let mut ar = tar::Archive::new(reader);
    let (mut entries, mut bytes) = (0u64, 0u64);
    // Directories last (as `Archive::unpack` does), so that a read-only one does not
    // keep its files out.
    let mut directories = Vec::new();
    for entry in ar.entries().map_err(|e| bad(&e))? {
        let mut entry = entry.map_err(|e| bad(&e))?;
        entries += 1;
        if entries > MAX_LAYOUT_ENTRIES {
            return Err(bad(&format!("more than {MAX_LAYOUT_ENTRIES} entries")));
        }
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                bytes = bytes.saturating_add(entry.size());
                if bytes > MAX_LAYOUT_BYTES {
                    return Err(bad(&format!("more than {MAX_LAYOUT_BYTES} bytes")));
                }
            }
            tar::EntryType::Directory => {
                directories.push(entry);
                continue;
            }
            _ => continue,
        }
        // `unpack_in` refuses entries escaping `dst` (absolute paths, `..`).
        entry.unpack_in(dst).map_err(|e| bad(&e))?;
    }
    directories.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut dir in directories {
        dir.unpack_in(dst).map_err(|e| bad(&e))?;
    }
    Ok(())
}
