//! Extended attributes: those in the inode's spare bytes, then those in its xattr block; a
//! value may live in an inode of its own (`ea_inode`). POSIX ACLs are stored in a compact form
//! of ext's own and are given back in the form `setxattr` takes.

use super::inode::Inode;
use super::{Ext, ExtFile};
use crate::tree::{FileData, Xattrs};
use crate::{le, FsError, Result};

const MAGIC: u32 = 0xEA02_0000;
/// The attribute that holds inline data: the file's contents, not an attribute to restore.
const INLINE_DATA: (u8, &[u8]) = (7, b"data");

/// An attribute's name from its index and suffix; `None` for an index this reader does not know.
fn full_name(index: u8, suffix: &[u8]) -> Option<Vec<u8>> {
    let prefix: &[u8] = match index {
        1 => b"user.",
        2 => b"system.posix_acl_access",
        3 => b"system.posix_acl_default",
        4 => b"trusted.",
        6 => b"security.",
        7 => b"system.",
        8 => b"system.richacl",
        _ => return None,
    };
    Some([prefix, suffix].concat())
}

/// `inode`'s attributes, in the order stored.
pub(super) fn read(fs: &Ext, inode: &Inode) -> Result<Xattrs> {
    let mut out = Vec::new();
    let start = 128 + inode.extra_isize();
    if start + 4 <= inode.raw.len() && le::u32(&inode.raw, start) == MAGIC {
        // In the inode, values are placed from the first entry on.
        let region = &inode.raw[start + 4..];
        entries(fs, inode, region, 0, &mut out)?;
    }
    if inode.file_acl != 0 {
        let b = fs.block(inode.file_acl)?;
        if le::u32(&b, 0) != MAGIC || le::u32(&b, 8) != 1 {
            return Err(FsError::Damaged(format!(
                "ext inode {}: its extended attribute block",
                inode.ino
            )));
        }
        // In a block, entries start after its 32-byte header and values from its first byte.
        entries(fs, inode, &b, 32, &mut out)?;
    }
    Ok(out)
}

/// The entries from `first` in `region` (value offsets count from its start).
fn entries(fs: &Ext, inode: &Inode, region: &[u8], first: usize, out: &mut Xattrs) -> Result<()> {
    let bad = || FsError::Damaged(format!("ext inode {}: an extended attribute", inode.ino));
    let mut pos = first;
    while pos + 4 <= region.len() && le::u32(region, pos) != 0 {
        let name_len = usize::from(region[pos]);
        let index = region.get(pos + 1).copied().ok_or_else(bad)?;
        let offs = usize::from(le::u16(region, pos + 2));
        let value_inode = u64::from(le::u32(region, pos + 4));
        let size = le::u32(region, pos + 8) as usize;
        let suffix = region.get(pos + 16..pos + 16 + name_len).ok_or_else(bad)?;
        pos += (16 + name_len + 3) & !3;
        if (index, suffix) == INLINE_DATA {
            continue;
        }
        let value = if value_inode != 0 {
            let holder = fs.inode(value_inode)?;
            if holder.size != size as u64 || size > 64 << 20 {
                return Err(bad());
            }
            let mut v = vec![0u8; size];
            let n = ExtFile::new(fs, &holder)?.read_at(0, &mut v)?;
            v.truncate(n);
            v
        } else {
            region.get(offs..offs + size).ok_or_else(bad)?.to_vec()
        };
        let Some(name) = full_name(index, suffix) else {
            continue;
        };
        let value = if matches!(index, 2 | 3) {
            acl_to_xattr(&value).ok_or_else(bad)?
        } else {
            value
        };
        out.push((name, value));
    }
    Ok(())
}

/// ext's ACL form (version 1; short entries for the owner, group, mask and other) to the
/// xattr form (version 2; every entry with an id, -1 where it has none).
fn acl_to_xattr(v: &[u8]) -> Option<Vec<u8>> {
    if v.len() < 4 || le::u32(v, 0) != 1 {
        return None;
    }
    let mut out = 2u32.to_le_bytes().to_vec();
    let mut pos = 4;
    while pos < v.len() {
        let (tag, perm) = (le::u16(v, pos), le::u16(v, pos + 2));
        let id = match tag {
            // ACL_USER and ACL_GROUP carry an id.
            0x02 | 0x08 => {
                let id = v.get(pos + 4..pos + 8)?;
                pos += 8;
                u32::from_le_bytes(id.try_into().ok()?)
            }
            0x01 | 0x04 | 0x10 | 0x20 => {
                pos += 4;
                u32::MAX
            }
            _ => return None,
        };
        if pos > v.len() {
            return None;
        }
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&perm.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acls_become_the_xattr_form() {
        // user::rw-, user:1000:r--, group::r--, mask::r--, other::---
        let mut ext = 1u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [(1u16, 6u16, None), (2, 4, Some(1000u32)), (4, 4, None)] {
            ext.extend_from_slice(&tag.to_le_bytes());
            ext.extend_from_slice(&perm.to_le_bytes());
            if let Some(id) = id {
                ext.extend_from_slice(&id.to_le_bytes());
            }
        }
        let x = acl_to_xattr(&ext).unwrap();
        assert_eq!(x.len(), 4 + 3 * 8);
        assert_eq!(le::u32(&x, 0), 2);
        assert_eq!(le::u32(&x, 8), u32::MAX);
        assert_eq!(le::u32(&x, 16), 1000);
        assert!(acl_to_xattr(&ext[..ext.len() - 2]).is_none(), "cut short");
        assert!(acl_to_xattr(&[2, 0, 0, 0]).is_none(), "wrong version");
    }
}
