//! Where generated code finds eda: `::eda::__private` for services, `::eda_core::__private` for
//! crates that only depend on the contract, or the path given with `crate = "…"`.
//!
//! The crate's own `Cargo.toml` says which: its normal dependencies first (a library whose
//! normal dependency is `eda-core` and whose tests use `eda-runtime` must expand to
//! `eda_core`, the only one its library build has), then its dev-dependencies (for tests,
//! examples and benches). A renamed dependency keeps its new name.

use std::path::{Path, PathBuf};

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote};
use toml_edit::{DocumentMut, Item, TableLike};

pub fn private(override_path: Option<&syn::Path>) -> syn::Result<TokenStream> {
    if let Some(path) = override_path {
        return Ok(quote!(#path::__private));
    }
    let found = manifests().and_then(|(own, workspace)| resolve(&own, workspace.as_deref()));
    match found {
        Ok(name) => {
            let name = format_ident!("{name}");
            Ok(quote!(::#name::__private))
        }
        Err(why) => Err(syn::Error::new(Span::call_site(), why)),
    }
}

/// The crate's `Cargo.toml`, and its workspace's when it has one elsewhere.
fn manifests() -> Result<(String, Option<String>), String> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .ok_or("CARGO_MANIFEST_DIR is not set: build with cargo, or give the path with `crate = \"…\"`")?;
    let read = |path: &Path| std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    let own = read(&dir.join("Cargo.toml"))?;
    let workspace = dir.ancestors().skip(1).map(|d| d.join("Cargo.toml")).filter(|p| p.is_file()).find_map(|p| {
        read(&p).ok().filter(|text| text.parse::<DocumentMut>().is_ok_and(|d| d.contains_key("workspace")))
    });
    Ok((own, workspace))
}

/// The crates eda's macros can expand to, by package, and the name each is used by when it is
/// not renamed (the runtime's library is named `eda`).
const CANDIDATES: [(&str, &str); 2] = [("eda-runtime", "eda"), ("eda-core", "eda_core")];

/// The name generated code uses for eda in the crate with this manifest.
fn resolve(manifest: &str, workspace: Option<&str>) -> Result<String, String> {
    let doc = manifest.parse::<DocumentMut>().map_err(|e| format!("Cargo.toml does not parse: {e}"))?;
    let workspace = workspace.and_then(|w| w.parse::<DocumentMut>().ok());
    let package = doc.get("package").and_then(|p| p.get("name")).and_then(Item::as_str);
    if let Some((_, lib)) = CANDIDATES.iter().find(|(pkg, _)| Some(*pkg) == package) {
        // The crate itself (its `extern crate self as …`).
        return Ok((*lib).to_owned());
    }
    // Plain normal dependencies first, then optional or target-specific ones (which a build
    // may lack), then dev-dependencies.
    let firm = |value: &Item| value.get("optional").and_then(Item::as_bool) != Some(true);
    let passes: [(&str, bool); 3] = [("dependencies", true), ("dependencies", false), ("dev-dependencies", false)];
    for (kind, firm_only) in passes {
        let tables = tables(&doc, kind, firm_only);
        for (pkg, lib) in CANDIDATES {
            for table in &tables {
                for (key, value) in table.iter() {
                    if (!firm_only || firm(value)) && package_of(key, value, workspace.as_ref()) == pkg {
                        return Ok(if key == pkg { lib.to_owned() } else { key.replace('-', "_") });
                    }
                }
            }
        }
    }
    Err("cannot find eda among this crate's dependencies: add `eda-runtime` (or, for a crate that only defines events, `eda-core`) to `[dependencies]` in Cargo.toml, or name a crate that re-exports it with `crate = \"…\"`".into())
}

/// `[dependencies]` (or `[dev-dependencies]`), and unless `top_only` the same tables under
/// every `[target.…]`.
fn tables<'a>(doc: &'a DocumentMut, kind: &str, top_only: bool) -> Vec<&'a dyn TableLike> {
    let top = doc.get(kind).and_then(Item::as_table_like);
    if top_only {
        return top.into_iter().collect();
    }
    let targets = doc.get("target").and_then(Item::as_table_like).into_iter().flat_map(|t| {
        t.iter().filter_map(|(_, cfg)| cfg.as_table_like()?.get(kind)?.as_table_like()).collect::<Vec<_>>()
    });
    top.into_iter().chain(targets).collect()
}

/// The package a dependency entry names: its `package = …`, the workspace's entry for
/// `workspace = true`, or its key.
fn package_of<'a>(key: &'a str, value: &'a Item, workspace: Option<&'a DocumentMut>) -> &'a str {
    if let Some(pkg) = value.get("package").and_then(Item::as_str) {
        return pkg;
    }
    if value.get("workspace").and_then(Item::as_bool) == Some(true) {
        let entry = workspace.and_then(|w| w.get("workspace")?.get("dependencies")?.get(key));
        if let Some(pkg) = entry.and_then(|e| e.get("package")).and_then(Item::as_str) {
            return pkg;
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_normal_dependency_wins_over_a_dev_dependency() {
        let library = r#"
            [package]
            name = "orders-events"
            [dependencies]
            eda-core = "0.1"
            [dev-dependencies]
            eda-runtime = "0.1"
        "#;
        assert_eq!(resolve(library, None).as_deref(), Ok("eda_core"));
        let service = "[package]\nname = \"shop\"\n[dependencies]\neda-core = \"0.1\"\neda-runtime = \"0.1\"\n";
        assert_eq!(resolve(service, None).as_deref(), Ok("eda"), "the runtime when both are normal");
        let tests_only = "[package]\nname = \"x\"\n[dev-dependencies]\neda-runtime = \"0.1\"\n";
        assert_eq!(resolve(tests_only, None).as_deref(), Ok("eda"));
    }

    #[test]
    fn renamed_workspace_and_target_dependencies_are_found_by_their_package() {
        let renamed =
            "[package]\nname = \"x\"\n[dependencies]\nbus = { package = \"eda-runtime\", version = \"0.1\" }\n";
        assert_eq!(resolve(renamed, None).as_deref(), Ok("bus"));
        let member = "[package]\nname = \"x\"\n[dependencies]\nmy-eda = { workspace = true }\n";
        let workspace = "[workspace.dependencies]\nmy-eda = { package = \"eda-runtime\", path = \"r\" }\n";
        assert_eq!(resolve(member, Some(workspace)).as_deref(), Ok("my_eda"));
        let plain = "[package]\nname = \"x\"\n[dependencies]\neda-runtime = { workspace = true }\n";
        assert_eq!(resolve(plain, Some("[workspace]\n")).as_deref(), Ok("eda"));
        let target = "[package]\nname = \"x\"\n[target.'cfg(unix)'.dependencies]\neda-core = \"0.1\"\n";
        assert_eq!(resolve(target, None).as_deref(), Ok("eda_core"));
        let optional = "[package]\nname = \"x\"\n[dependencies]\neda-core = \"0.1\"\neda-runtime = { version = \"0.1\", optional = true }\n";
        assert_eq!(resolve(optional, None).as_deref(), Ok("eda_core"), "the one every build has");
        assert_eq!(resolve("[package]\nname = \"eda-runtime\"\n", None).as_deref(), Ok("eda"), "itself");
    }

    #[test]
    fn without_eda_the_error_says_what_to_add() {
        let err = resolve("[package]\nname = \"x\"\n[dependencies]\nserde = \"1\"\n", None).expect_err("not found");
        assert!(err.contains("`eda-runtime`") && err.contains("crate = "), "{err}");
    }
}
