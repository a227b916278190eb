//! Parsing of `key = value` attribute arguments, shared by the macros.

use proc_macro2::{Span, TokenStream};
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;

/// Collects every error of one macro invocation, to report them together.
#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, e: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(e),
            None => self.0 = Some(e),
        }
    }

    pub fn spanned(&mut self, tokens: impl quote::ToTokens, message: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    pub fn at(&mut self, span: Span, message: impl std::fmt::Display) {
        self.push(syn::Error::new(span, message));
    }

    pub fn to_compile_errors(&self) -> TokenStream {
        self.0.as_ref().map(syn::Error::to_compile_error).unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

/// Walks `key = value` arguments: rejects unknown and repeated keys, hands each known key to
/// `on_key`, and keeps going after an error so that all of them are reported.
pub fn parse_args(
    args: TokenStream,
    macro_name: &str,
    keys: &[&str],
    errors: &mut Errors,
    mut on_key: impl FnMut(&str, &ParseNestedMeta) -> syn::Result<()>,
) {
    let mut seen: Vec<String> = Vec::new();
    // Keys of the macros' own (`__eda_…`) are not offered to users.
    let expected =
        keys.iter().filter(|k| !k.starts_with("__")).map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ");
    let mut local = Errors::default();
    let parser = syn::meta::parser(|meta| {
        let key = meta.path.get_ident().map(ToString::to_string).unwrap_or_default();
        let outcome = if !keys.contains(&key.as_str()) {
            Err(meta.error(format!("unknown key in `#[{macro_name}(…)]`: expected one of {expected}")))
        } else if seen.contains(&key) {
            Err(meta.error(format!("`{key}` is given twice in `#[{macro_name}(…)]`: give it once")))
        } else {
            seen.push(key.clone());
            on_key(&key, &meta)
        };
        if let Err(e) = outcome {
            local.push(e);
            skip_value(&meta);
        }
        Ok(())
    });
    if let Err(e) = parser.parse2(args) {
        local.push(e);
    }
    if let Some(e) = local.0 {
        errors.push(e);
    }
}

/// After an error, consumes the rest of `= value` so parsing can go on with the next key.
fn skip_value(meta: &ParseNestedMeta) {
    if meta.input.peek(syn::Token![=]) {
        if let Ok(value) = meta.value() {
            let _ = value.parse::<syn::Expr>();
        }
    }
}

/// The value of `key = "…"`.
pub fn lit_str(meta: &ParseNestedMeta) -> syn::Result<syn::LitStr> {
    meta.value()?
        .parse::<syn::LitStr>()
        .map_err(|e| syn::Error::new(e.span(), "expected a string literal: `key = \"…\"`"))
}

/// The value of `key = ident`.
pub fn ident(meta: &ParseNestedMeta, what: &str) -> syn::Result<syn::Ident> {
    meta.value()?.parse::<syn::Ident>().map_err(|e| syn::Error::new(e.span(), format!("expected {what}")))
}

/// The value of `key = 123`.
pub fn int<T: std::str::FromStr>(meta: &ParseNestedMeta, what: &str) -> syn::Result<(T, Span)>
where
    T::Err: std::fmt::Display,
{
    let lit =
        meta.value()?.parse::<syn::LitInt>().map_err(|e| syn::Error::new(e.span(), format!("expected {what}")))?;
    let value = lit.base10_parse::<T>().map_err(|e| syn::Error::new(lit.span(), format!("expected {what}: {e}")))?;
    Ok((value, lit.span()))
}

/// The value of `crate = "path"`.
pub fn crate_path(meta: &ParseNestedMeta) -> syn::Result<syn::Path> {
    let lit = lit_str(meta)?;
    lit.parse::<syn::Path>()
        .map_err(|_| syn::Error::new(lit.span(), "expected the path of a crate: `crate = \"my_facade::eda\"`"))
}

/// A topic or group name: letters, digits, `.`, `-` and `_`, so that it is a valid Kafka topic,
/// RabbitMQ routing key, NATS subject and SQL value alike.
pub fn check_name(lit: &syn::LitStr, what: &str, errors: &mut Errors) {
    let value = lit.value();
    if value.is_empty() {
        errors.spanned(lit, format!("the {what} name is empty"));
    } else if value.len() > 200 {
        errors.spanned(lit, format!("the {what} name is longer than 200 characters"));
    } else if let Some(c) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))) {
        errors.spanned(
            lit,
            format!("`{c}` cannot appear in a {what} name: use letters, digits, `.`, `-` and `_` (every broker accepts those)"),
        );
    } else if value.starts_with('.') || value.ends_with('.') || value.contains("..") {
        errors.spanned(lit, format!("a {what} name cannot start or end with `.` or contain `..`"));
    }
}
