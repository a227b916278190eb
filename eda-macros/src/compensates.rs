//! `#[compensates(step)]`: hands `compensates = step` to the `#[handler]` below it.

use proc_macro2::{Span, TokenStream};
use quote::quote;

use crate::attr::Errors;

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let step = match syn::parse2::<syn::Path>(args.clone()) {
        Ok(p) => Some(p),
        Err(_) => {
            let span = if args.is_empty() { Span::call_site() } else { syn::spanned::Spanned::span(&args) };
            errors.at(
                span,
                "`#[compensates]` names the handler whose effects it undoes: `#[compensates(reserve_stock)]`",
            );
            None
        }
    };
    let mut func = match syn::parse2::<syn::ItemFn>(item.clone()) {
        Ok(f) => f,
        Err(_) => {
            errors.at(Span::call_site(), "`#[compensates]` goes on a `#[handler]` function");
            let e = errors.to_compile_errors();
            return quote!(#item #e);
        }
    };
    let handler = func.attrs.iter_mut().find(|a| a.path().segments.last().is_some_and(|s| s.ident == "handler"));
    match (handler, step) {
        (Some(attr), Some(step)) => {
            let path = attr.path().clone();
            let existing = match &attr.meta {
                syn::Meta::List(list) => list.tokens.clone(),
                _ => TokenStream::new(),
            };
            let sep =
                if existing.is_empty() || crate::handler::ends_with_comma(&existing) { quote!() } else { quote!(,) };
            *attr = syn::parse_quote!(#[#path(#existing #sep compensates = #step)]);
        }
        // No attribute named `handler` here: it may be renamed (`use eda::handler as on;`).
        // Leave the step for it, by a private attribute that it takes, and that says what is
        // missing if no handler comes to take it.
        (None, Some(step)) => match crate::paths::private(None) {
            Ok(p) => func.attrs.push(syn::parse_quote!(#[#p::__compensates(#step)])),
            Err(e) => errors.push(e),
        },
        (_, None) => {}
    }
    let e = errors.to_compile_errors();
    quote!(#func #e)
}

/// `#[__compensates(step)]` left by `#[compensates]` that no `#[handler]` took.
pub fn unclaimed(item: TokenStream) -> TokenStream {
    let e = syn::Error::new(
        Span::call_site(),
        "`#[compensates]` goes with `#[handler]`: add `#[handler(group = \"…\")]` to this function",
    )
    .to_compile_error();
    quote!(#item #e)
}
