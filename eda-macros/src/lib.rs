//! Attribute macros of eda. Use them through `eda` (or `eda-core` in a crate that only
//! defines events): `#[eda::event]`, `#[eda::handler]`, `#[eda::compensates]`.
//!
//! Each macro parses its arguments, checks them, and expands; every problem it finds is
//! reported together, on the tokens at fault, and the original item is emitted as well so
//! the rest of the crate still type-checks.

mod attr;
mod compensates;
mod event;
mod handler;
mod paths;

use proc_macro::TokenStream;

/// Makes a type an event bound to a topic.
///
/// Keys: `topic = "…"` (required), `key = field` (the partition key: events with the same key
/// are handled in order), `name = "…"` (defaults to the type's name), `version = N` (defaults
/// to 1; the CloudEvents `type` is `<name>.v<N>`), `crate = "…"` (the path of a crate that
/// re-exports eda).
///
/// The type must also derive `serde::Serialize` and `serde::Deserialize`.
#[proc_macro_attribute]
pub fn event(args: TokenStream, item: TokenStream) -> TokenStream {
    event::expand(args.into(), item.into()).into()
}

/// Makes an `async fn` a handler of the event type it takes.
///
/// `async fn name(event: E, cx: Ctx<'_, State>) -> R`, where `cx` may be left out and `R` is
/// `()`, an event, `Option<E>`, `Vec<E>`, `Outcome<S, F>`, a tuple of these, or a `Result` of
/// one of these.
///
/// Keys: `group = "…"` (required: the consumer group), `topic = "…"` (optional; must be the
/// event's topic, checked at compile time), `name = "…"`, `idempotent = false` (turns the
/// idempotency guard off), `dedupe_key = field` (guard by a field of the event instead of its
/// id), `concurrency = N`, `max_attempts = N`, `compensates = step`, `crate = "…"`.
///
/// It also defines a marker type of the function's name, for explicit registration
/// (`Registry::builder().handler::<name>()`) and `#[compensates(name)]`. The marker comes into
/// the module by a glob import, so a module or type of the same name may stand beside the
/// function as plain Rust allows; it then hides the marker, and the handler registers through
/// inventory only. Attribute macros below `#[handler]` (a renamed `#[compensates]`,
/// `#[instrument]`) run before it.
#[proc_macro_attribute]
pub fn handler(args: TokenStream, item: TokenStream) -> TokenStream {
    handler::expand(args.into(), item.into()).into()
}

/// Marks a `#[handler]` as the compensating action of saga step `step` (another handler):
/// `#[compensates(reserve_stock)]`. It runs only when the step's effects happened for the same
/// correlation id; if it arrives first, the step will not run at all.
#[proc_macro_attribute]
pub fn compensates(args: TokenStream, item: TokenStream) -> TokenStream {
    compensates::expand(args.into(), item.into()).into()
}

/// Not public API: what `#[compensates]` leaves for a `#[handler]` it cannot see by name (a
/// renamed import). Reached on its own, no handler took it: an error says what is missing.
#[doc(hidden)]
#[proc_macro_attribute]
pub fn __compensates(_args: TokenStream, item: TokenStream) -> TokenStream {
    compensates::unclaimed(item.into()).into()
}
