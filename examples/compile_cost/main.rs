//! What the macros cost at compile time: generates a crate of 200 events and 200 handlers
//! written with `#[event]` and `#[handler]`, and the same crate written by hand as what the
//! macros expand to, builds each several times (dependencies built once beforehand, then only
//! the crate itself, from clean), and prints the median times and the macros' share.
//!
//! ```text
//! cargo run --release -p eda-examples --bin compile-cost -- [--items 200] [--rounds 3] [--json]
//! ```
//!
//! The expanded code is identical, so the difference between the two builds is the cost of
//! running the macros (parsing, checking, expanding), not of compiling what they produce.
//!
//! Building the macro crate itself (eda-macros with syn's full parser, quote, proc-macro2 and
//! toml_edit) is a one-time cost of every clean build, left out of that comparison: it is
//! measured apart, as a clean build of a crate using serde's derive (which brings syn, quote
//! and proc-macro2 anyway) with and without eda-macros, each from an empty target directory,
//! and `cargo build --timings` writes the per-crate report of the last one.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

type BoxError = Box<dyn std::error::Error>;

const P: &str = "::eda_core::__private";

fn manifest(name: &str, core: &Path) -> String {
    format!(
        "[package]\nname = \"{name}\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
         [dependencies]\neda-core = {{ path = \"{}\" }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n\n\
         [workspace]\n",
        core.display()
    )
}

fn with_macros(items: usize) -> String {
    let mut src = String::from("use eda_core::{event, handler};\nuse serde::{Deserialize, Serialize};\n\n");
    for i in 0..items {
        let (topic, group, next) = (i % 10, i % 20, (i + 1) % items);
        let _ = write!(
            src,
            "#[event(topic = \"t{topic}\", key = id)]\n#[derive(Serialize, Deserialize)]\npub struct E{i} {{ pub id: u64 }}\n\n\
             #[handler(group = \"g{group}\")]\npub async fn h{i}(ev: E{i}) -> E{next} {{ E{next} {{ id: ev.id }} }}\n\n"
        );
    }
    src
}

/// The same crate as [`with_macros`], written as the macros expand it.
fn by_hand(items: usize) -> String {
    let mut src = String::from("use serde::{Deserialize, Serialize};\n\n");
    for i in 0..items {
        let (topic, group, next) = (i % 10, i % 20, (i + 1) % items);
        let _ = write!(
            src,
            "#[derive(Serialize, Deserialize)]\npub struct E{i} {{ pub id: u64 }}\n\
             const _: () = {{\n    #[automatically_derived]\n    impl {P}::Event for E{i} {{\n\
             const INFO: {P}::EventInfo = {P}::EventInfo {{ name: \"E{i}\", version: 1u32, ce_type: \"E{i}.v1\", topic: \"t{topic}\", path: {P}::concat!({P}::module_path!(), \"::E{i}\") }};\n\
             fn key(&self) -> {P}::Option<{P}::String> {{ {P}::Some({P}::ToString::to_string(&self.id)) }}\n    }}\n}};\n\n\
             pub async fn h{i}(ev: E{i}) -> E{next} {{ E{next} {{ id: ev.id }} }}\n\
             #[doc(hidden)]\n#[allow(non_snake_case)]\npub mod __eda_handler_h{i} {{\n    #[allow(non_camel_case_types, dead_code)]\n    pub struct h{i} {{}}\n}}\n\
             #[doc(hidden)]\n#[allow(unused_imports)]\npub use __eda_handler_h{i}::*;\n\
             const _: () = {{\n    #[allow(non_camel_case_types)]\n    struct __EdaHandlerFn;\n    #[automatically_derived]\n    impl {P}::HandlerFn for __EdaHandlerFn {{\n\
             type Event = E{i};\n        type State = ();\n        type Output = E{next};\n\
             fn call<'a>(event: Self::Event, cx: {P}::Ctx<'a, Self::State>) -> {P}::BoxFuture<'a, Self::Output> {{ {{ let _ = cx; {P}::Box::pin(h{i}(event)) }} }}\n    }}\n\
             static __EDA_HANDLER: {P}::HandlerDescriptor = {P}::describe::<__EdaHandlerFn>({P}::HandlerAttrs {{\n\
             name: \"h{i}\", module: {P}::module_path!(), group: \"g{group}\", compensates: {P}::None,\n\
             idempotency: {P}::Idempotency::EventId, concurrency: {P}::None, max_attempts: {P}::None }});\n\
             #[automatically_derived]\n    impl {P}::Handler for __eda_handler_h{i}::h{i} {{ fn descriptor() -> &'static {P}::HandlerDescriptor {{ &__EDA_HANDLER }} }}\n\
             {P}::inventory::submit! {{ {P}::HandlerRegistration(&__EDA_HANDLER) }}\n}};\n\n"
        );
    }
    src
}

fn write_crate(dir: &Path, name: &str, core: &Path, src: &str) -> Result<PathBuf, BoxError> {
    let root = dir.join(name);
    std::fs::create_dir_all(root.join("src"))?;
    std::fs::write(root.join("Cargo.toml"), manifest(name, core))?;
    std::fs::write(root.join("src/lib.rs"), src)?;
    Ok(root)
}

/// Builds the crate (and, the first time, its dependencies); returns how long it took.
fn build(root: &Path, target: &Path) -> Result<Duration, BoxError> {
    build_with(root, target, &[])
}

fn build_with(root: &Path, target: &Path, extra: &[&str]) -> Result<Duration, BoxError> {
    let start = Instant::now();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .args(extra)
        .env("CARGO_TARGET_DIR", target)
        .status()?;
    if !status.success() {
        return Err(format!("building {} failed", root.display()).into());
    }
    Ok(start.elapsed())
}

/// Forces the crate itself, and only it, to be compiled again from clean.
fn touch(root: &Path, target: &Path, name: &str) -> Result<(), BoxError> {
    let src = root.join("src/lib.rs");
    let text = std::fs::read_to_string(&src)?;
    std::fs::write(&src, text)?;
    let prefix = name.replace('-', "_");
    for dir in ["debug/deps", "debug/.fingerprint", "debug/incremental"] {
        let Ok(entries) = std::fs::read_dir(target.join(dir)) else { continue };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if file.starts_with(&prefix) || file.starts_with(&format!("lib{prefix}")) || file.starts_with(name) {
                let path = e.path();
                let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            }
        }
    }
    Ok(())
}

/// A crate that only uses serde's derive, and optionally eda-macros: what building the macro
/// crate adds to a clean build that already pays for syn through serde.
fn deps_crate(dir: &Path, name: &str, macros: Option<&Path>) -> Result<PathBuf, BoxError> {
    let root = dir.join(name);
    std::fs::create_dir_all(root.join("src"))?;
    let eda = macros.map_or(String::new(), |m| format!("eda-macros = {{ path = \"{}\" }}\n", m.display()));
    std::fs::write(
        root.join("Cargo.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
             [dependencies]\nserde = {{ version = \"1\", features = [\"derive\"] }}\n{eda}\n[workspace]\n"
        ),
    )?;
    std::fs::write(root.join("src/lib.rs"), "#[derive(serde::Serialize)]\npub struct A { pub id: u64 }\n")?;
    Ok(root)
}

/// Clean builds of [`deps_crate`] without and with eda-macros, alternating; the medians, and
/// where the `--timings` report of the last build with eda-macros is.
fn macro_crate_cost(dir: &Path, macros: &Path, rounds: usize) -> Result<(Duration, Duration, PathBuf), BoxError> {
    let (plain, with) = (deps_crate(dir, "deps-serde", None)?, deps_crate(dir, "deps-serde-eda", Some(macros))?);
    // Resolve and fetch once, outside the clock.
    for root in [&plain, &with] {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["fetch", "--quiet", "--manifest-path"])
            .arg(root.join("Cargo.toml"))
            .status()?;
        if !status.success() {
            return Err(format!("fetching the dependencies of {} failed", root.display()).into());
        }
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for eda_first in [round % 2 == 0, round % 2 != 0] {
            let (root, into) = if eda_first { (&with, &mut b) } else { (&plain, &mut a) };
            let target = root.join("target");
            let _ = std::fs::remove_dir_all(&target);
            let last = eda_first && round + 1 == rounds;
            into.push(build_with(root, &target, if last { &["--timings"] } else { &[] })?);
        }
    }
    Ok((median(a), median(b), with.join("target/cargo-timings/cargo-timing.html")))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<(), BoxError> {
    let mut items = 200;
    let mut rounds = 3;
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--items" => items = args.next().and_then(|v| v.parse().ok()).ok_or("--items takes a number")?,
            "--rounds" => rounds = args.next().and_then(|v| v.parse().ok()).ok_or("--rounds takes a number")?,
            "--json" => json = true,
            other => return Err(format!("unknown flag `{other}`; use --items N, --rounds N, --json").into()),
        }
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("no workspace")?.to_path_buf();
    let core = workspace.join("eda-core");
    let dir = workspace.join("target").join("compile-cost");
    let target = dir.join("target");
    let macros = write_crate(&dir, "gen-with-macros", &core, &with_macros(items))?;
    let hand = write_crate(&dir, "gen-by-hand", &core, &by_hand(items))?;
    // Dependencies once, for both.
    build(&macros, &target)?;
    build(&hand, &target)?;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for macros_first in [round % 2 == 0, round % 2 != 0] {
            let (root, name, into) = if macros_first {
                (&macros, "gen-with-macros", &mut with)
            } else {
                (&hand, "gen-by-hand", &mut without)
            };
            touch(root, &target, name)?;
            into.push(build(root, &target)?);
        }
    }
    let (w, h) = (median(with), median(without));
    let share = if w > h { (w - h).as_secs_f64() / w.as_secs_f64() } else { 0.0 };
    let (serde_only, serde_eda, timings) = macro_crate_cost(&dir, &workspace.join("eda-macros"), rounds)?;
    if json {
        println!(
            "{{\"scenario\":\"compile-time\",\"items\":{items},\"with_macros_s\":{:.2},\"by_hand_s\":{:.2},\"macro_share\":{:.3},\"clean_serde_s\":{:.2},\"clean_serde_and_eda_macros_s\":{:.2}}}",
            w.as_secs_f64(),
            h.as_secs_f64(),
            share,
            serde_only.as_secs_f64(),
            serde_eda.as_secs_f64()
        );
    } else {
        println!("{items} events and {items} handlers, clean build of the crate alone (median of {rounds}):");
        println!("  with #[event]/#[handler]   {:>6.2} s", w.as_secs_f64());
        println!("  expanded by hand           {:>6.2} s", h.as_secs_f64());
        println!(
            "  running the macros         {:>6.2} s ({:.0}% of the build)",
            (w.saturating_sub(h)).as_secs_f64(),
            share * 100.0
        );
        println!("clean build of the dependencies alone, from an empty target directory (median of {rounds}):");
        println!("  serde with its derive      {:>6.2} s", serde_only.as_secs_f64());
        println!("  the same and eda-macros    {:>6.2} s", serde_eda.as_secs_f64());
        println!("  what eda-macros adds       {:>6.2} s", serde_eda.saturating_sub(serde_only).as_secs_f64());
        println!("  per-crate report: {}", timings.display());
    }
    Ok(())
}
