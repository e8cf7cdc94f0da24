//! What the agent's binary keeps resident in every running agent: its
//! embedded eBPF object without DWARF (the kernel and aya read its BTF),
//! and its relative relocations packed (DT_RELR) where the build's glibc
//! reads them. Each was 0.55–0.8 MiB of the soak's RSS (`build.rs`).
use object::{Object, ObjectSection};

#[test]
fn the_embedded_object_has_its_btf_and_no_dwarf() {
    let obj = object::File::parse(tagflow::loader::TAGFLOW_OBJECT).expect("the eBPF object");
    let names: Vec<&str> = obj.sections().filter_map(|s| s.name().ok()).collect();
    for needed in [".BTF", ".BTF.ext", "classifier", "maps"] {
        assert!(names.contains(&needed), "{needed} missing: {names:?}");
    }
    let dwarf: Vec<_> = names.iter().filter(|n| n.contains(".debug")).collect();
    assert!(dwarf.is_empty(), "DWARF embedded: {dwarf:?}");
}

#[test]
fn relative_relocations_are_packed_where_glibc_reads_them() {
    // SAFETY: returns a static NUL-terminated string ("2.36").
    let glibc = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
    let glibc = glibc.to_str().unwrap_or("");
    let mut parts = glibc.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let bytes = std::fs::read(env!("CARGO_BIN_EXE_tagflow")).expect("the tagflow binary");
    let bin = object::File::parse(&*bytes).expect("an ELF");
    let size = |name| bin.section_by_name(name).map_or(0, |s| s.size());
    if version < (2, 36) {
        assert_eq!(size(".relr.dyn"), 0, "glibc {glibc} cannot read DT_RELR");
        return;
    }
    assert!(size(".relr.dyn") > 0, "no .relr.dyn (glibc {glibc})");
    assert!(
        size(".rela.dyn") < 64 * 1024,
        ".rela.dyn still {} bytes",
        size(".rela.dyn")
    );
}
