//! Compile-time promises of the macros: what must compile, and what must not, with the error a
//! user sees. Regenerate the `.stderr` files with `TRYBUILD=overwrite` and review the diff.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("ui/pass/*.rs");
    cases.compile_fail("ui/fail/*/*.rs");
}
