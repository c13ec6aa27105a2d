//! NumPy `.npy` files: the reader and writer are `rxd_protocol::npy` (re-exported here);
//! rxctl's file names for outputs are this module's.

pub use rxd_protocol::npy::{descr, read, write};

/// The file name (`….npy`) an output named `name` is written to by `rxctl infer -o DIR`:
/// ASCII letters, digits, `_`, `-` and `.` stay, every other byte (UTF-8) becomes `%XX`, as
/// does a leading `.`; a name that would exceed 200 bytes is cut and ends in `~` and a hash of
/// the whole name. So `save_infer_model/scale_0.tmp_1` → `save_infer_model%2Fscale_0.tmp_1.npy`
/// and `/model/Conv_output_0` → `%2Fmodel%2FConv_output_0.npy`: always one plain file inside
/// the directory (never a path, `.` or `..`), and different names give different files.
pub fn file_name(name: &str) -> String {
    const MAX: usize = 200;
    let mut out = String::with_capacity(name.len() + 4);
    for (i, b) in name.bytes().enumerate() {
        let plain = b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-') || (b == b'.' && i > 0);
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.len() > MAX {
        // FNV-1a over the name: `~` never appears in an encoded name, so a cut name cannot
        // equal another name's whole encoding.
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let mut cut = MAX - 17;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str(&format!("~{hash:016x}"));
    }
    out.push_str(".npy");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_file_names_are_plain_distinct_files() {
        assert_eq!(file_name("label"), "label.npy");
        assert_eq!(
            file_name("save_infer_model/scale_0.tmp_1"),
            "save_infer_model%2Fscale_0.tmp_1.npy"
        );
        assert_eq!(
            file_name("/model/Conv_output_0"),
            "%2Fmodel%2FConv_output_0.npy"
        );
        assert_eq!(file_name(".."), "%2E..npy");
        assert_eq!(file_name("a%2Fb"), "a%252Fb.npy");
        assert_eq!(file_name("größe"), "gr%C3%B6%C3%9Fe.npy");
        let names = [
            "a/b", "a%2Fb", "a_b", ".", "..", "", "a b", "a\\b", ".hidden", "x.npy",
        ];
        let files: std::collections::HashSet<String> = names.iter().map(|n| file_name(n)).collect();
        assert_eq!(files.len(), names.len(), "{files:?}");
        for f in &files {
            assert!(!f.contains('/') && f != "." && f != "..", "{f}");
        }
        let long = "x/".repeat(300);
        let longer = format!("{long}y");
        assert!(file_name(&long).len() <= 204);
        assert_ne!(file_name(&long), file_name(&longer));
    }
}
