//! `#[handler(group = "…", topic = "…", …)] async fn name(ev: E, cx: Ctx<'_, S>) -> R`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::ext::IdentExt;
use syn::spanned::Spanned;

use crate::attr::{self, Errors};

const GROUP: &str = "group";
const TOPIC: &str = "topic";
const NAME: &str = "name";
const IDEMPOTENT: &str = "idempotent";
const DEDUPE_KEY: &str = "dedupe_key";
const CONCURRENCY: &str = "concurrency";
const MAX_ATTEMPTS: &str = "max_attempts";
const COMPENSATES: &str = "compensates";
const CRATE: &str = "crate";
/// Set on the `#[handler]` this macro re-emits below other attribute macros (see `defer`).
const DEFERRED: &str = "__eda_deferred";
const KEYS: &[&str] =
    &[GROUP, TOPIC, NAME, IDEMPOTENT, DEDUPE_KEY, CONCURRENCY, MAX_ATTEMPTS, COMPENSATES, CRATE, DEFERRED];

/// Attributes that are not macros: they stay on the function and need nothing done first.
const INERT: &[&str] = &[
    "doc",
    "allow",
    "warn",
    "deny",
    "forbid",
    "expect",
    "cfg",
    "cfg_attr",
    "inline",
    "cold",
    "must_use",
    "deprecated",
    "track_caller",
    "no_mangle",
    "export_name",
    "link_section",
    "automatically_derived",
    "rustfmt",
    "clippy",
    "diagnostic",
];

#[derive(Default)]
struct Args {
    group: Option<syn::LitStr>,
    topic: Option<syn::LitStr>,
    name: Option<syn::LitStr>,
    idempotent: Option<syn::LitBool>,
    dedupe_key: Option<syn::Ident>,
    concurrency: Option<usize>,
    max_attempts: Option<u32>,
    compensates: Option<syn::Path>,
    krate: Option<syn::Path>,
    deferred: bool,
}

/// The parts of the signature the expansion needs.
struct Signature {
    event: syn::Type,
    state: Option<syn::Type>,
    ret: syn::Type,
}

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let mut func = match syn::parse2::<syn::ItemFn>(item.clone()) {
        Ok(f) => f,
        Err(_) => {
            errors.at(Span::call_site(), "`#[handler]` goes on an `async fn` that takes an event");
            let e = errors.to_compile_errors();
            return quote!(#item #e);
        }
    };
    let raw_args = args.clone();
    let mut args = parse(args, &mut errors);
    let p = crate::paths::private(args.krate.as_ref()).unwrap_or_else(|e| {
        errors.push(e);
        quote!(::eda::__private)
    });
    if !args.deferred && errors.is_empty() && func.attrs.iter().any(may_be_macro) {
        return defer(func, &p, raw_args);
    }
    take_compensates_attr(&mut func, &mut args, &mut errors);
    let sig = check(&func, &args, &mut errors);
    let compile_errors = errors.to_compile_errors();
    match sig {
        Some(sig) if errors.is_empty() => {
            let generated = generate(&func, &args, &sig, &p);
            quote!(#func #generated)
        }
        // The marker still exists, so `Registry::builder().handler::<name>()` and
        // `#[compensates(name)]` elsewhere add no errors of their own to the real one.
        // (Not for a method: no module or import may stand in an `impl` block.)
        _ if func.sig.receiver().is_some() => quote!(#func #compile_errors),
        _ => {
            let stub = stub(&func, &p);
            quote!(#func #stub #compile_errors)
        }
    }
}

/// True for an attribute that may be a macro (a renamed `#[compensates]`, `#[instrument]`, …).
fn may_be_macro(attr: &syn::Attribute) -> bool {
    let path = attr.path();
    let first = path.segments.first().map(|s| s.ident.to_string()).unwrap_or_default();
    let last = path.segments.last().map(|s| s.ident.to_string()).unwrap_or_default();
    !(INERT.contains(&first.as_str()) || ["compensates", "__compensates", "handler"].contains(&last.as_str()))
}

/// Attribute macros below this one have not run yet, and one of them may be a renamed
/// `#[compensates]` (`use eda::compensates as undoes;`) that must reach this handler: emit the
/// function with `#[handler]` again, by its absolute path, after them, so they run first.
fn defer(mut func: syn::ItemFn, p: &TokenStream, args: TokenStream) -> TokenStream {
    let sep = if args.is_empty() || ends_with_comma(&args) { quote!() } else { quote!(,) };
    let deferred = format_ident!("{DEFERRED}");
    func.attrs.push(syn::parse_quote!(#[#p::handler(#args #sep #deferred)]));
    quote!(#func)
}

/// True when the tokens end with `,` (a trailing comma in attribute arguments).
pub fn ends_with_comma(tokens: &TokenStream) -> bool {
    matches!(tokens.clone().into_iter().last(), Some(proc_macro2::TokenTree::Punct(p)) if p.as_char() == ',')
}

fn parse(args: TokenStream, errors: &mut Errors) -> Args {
    let mut out = Args::default();
    attr::parse_args(args, "handler", KEYS, errors, |key, meta| {
        match key {
            GROUP => out.group = Some(attr::lit_str(meta)?),
            TOPIC => out.topic = Some(attr::lit_str(meta)?),
            NAME => out.name = Some(attr::lit_str(meta)?),
            IDEMPOTENT => {
                out.idempotent = Some(meta.value()?.parse::<syn::LitBool>().map_err(|e| {
                    syn::Error::new(e.span(), "expected `true` or `false`: `idempotent = false` turns the guard off")
                })?)
            }
            DEDUPE_KEY => {
                out.dedupe_key = Some(attr::ident(meta, "the event field to deduplicate by: `dedupe_key = order_id`")?)
            }
            CONCURRENCY => {
                let (n, span) = attr::int::<usize>(meta, "how many events may be handled at once: `concurrency = 8`")?;
                if n == 0 {
                    return Err(syn::Error::new(span, "`concurrency` is at least 1"));
                }
                out.concurrency = Some(n);
            }
            MAX_ATTEMPTS => {
                let (n, span) = attr::int::<u32>(meta, "how many attempts a failing event gets: `max_attempts = 5`")?;
                if n == 0 {
                    return Err(syn::Error::new(span, "`max_attempts` is at least 1"));
                }
                out.max_attempts = Some(n);
            }
            COMPENSATES => {
                out.compensates = Some(meta.value()?.parse::<syn::Path>().map_err(|e| {
                    syn::Error::new(
                        e.span(),
                        "expected the name of the handler this one undoes: `compensates = reserve_stock`",
                    )
                })?)
            }
            DEFERRED => out.deferred = true,
            _ => out.krate = Some(attr::crate_path(meta)?),
        }
        Ok(())
    });
    out
}

/// `#[compensates(step)]` written below `#[handler]` is still on the function when this macro
/// runs: take it from there.
fn take_compensates_attr(func: &mut syn::ItemFn, args: &mut Args, errors: &mut Errors) {
    // `__compensates` is what `#[compensates]` above a renamed `#[handler]` leaves for it.
    let is_compensates = |a: &syn::Attribute| {
        a.path().segments.last().is_some_and(|s| s.ident == "compensates" || s.ident == "__compensates")
    };
    let (found, rest): (Vec<_>, Vec<_>) = func.attrs.drain(..).partition(is_compensates);
    func.attrs = rest;
    for a in found {
        match a.parse_args::<syn::Path>() {
            Ok(path) if args.compensates.is_none() => args.compensates = Some(path),
            Ok(path) => errors.spanned(path, "a handler compensates one step: give `compensates` once"),
            Err(_) => errors.spanned(a, "`#[compensates]` names the step it undoes: `#[compensates(reserve_stock)]`"),
        }
    }
}

fn check(func: &syn::ItemFn, args: &Args, errors: &mut Errors) -> Option<Signature> {
    let name = &func.sig.ident;
    match &args.group {
        Some(group) => attr::check_name(group, "group", errors),
        None => errors.at(
            Span::call_site(),
            "`#[handler]` needs its consumer group: `#[handler(group = \"inventory-service\")]`",
        ),
    }
    if let Some(topic) = &args.topic {
        attr::check_name(topic, "topic", errors);
    }
    if let Some(n) = &args.name {
        attr::check_name(n, "handler", errors);
    }
    if let (Some(off), Some(key)) = (&args.idempotent, &args.dedupe_key) {
        if !off.value {
            errors.spanned(
                key,
                "`dedupe_key` configures the idempotency guard, which `idempotent = false` turns off: drop one",
            );
        }
    }
    let sig = &func.sig;
    if sig.asyncness.is_none() {
        errors.spanned(sig.fn_token, format!("a handler must be `async`: write `async fn {name}(…)`"));
    }
    if let Some(c) = &sig.constness {
        errors.spanned(c, "a handler cannot be `const`");
    }
    // Lifetimes are fine (`async fn charge<'a>(ev: E, cx: Ctx<'a, S>)`); types and constants
    // would leave the registry without one concrete event type.
    let generic = sig.generics.params.iter().find(|p| !matches!(p, syn::GenericParam::Lifetime(_)));
    if let Some(param) = generic {
        errors.spanned(param, "a handler cannot be generic: the registry needs one concrete event type");
    } else if let Some(clause) = &sig.generics.where_clause {
        errors.spanned(clause, "a handler takes no `where` clause: its event and state types are concrete");
    }
    if let Some(v) = &sig.variadic {
        errors.spanned(v, "a handler cannot be variadic");
    }
    let usage = format!("a handler takes its event and, optionally, its context: `async fn {name}(event: MyEvent, cx: Ctx<'_, MyState>)`");
    let mut inputs = sig.inputs.iter();
    let event = match inputs.next() {
        Some(syn::FnArg::Receiver(r)) => {
            errors.spanned(r, "a handler is a free function, not a method: move it out of the `impl` block");
            return None;
        }
        Some(syn::FnArg::Typed(arg)) => match &*arg.ty {
            syn::Type::Reference(r) => {
                let inner = &r.elem;
                errors.spanned(
                    r,
                    format!("take the event by value: `{}: {}`", arg.pat.to_token_stream(), inner.to_token_stream()),
                );
                None
            }
            ty => Some(ty.clone()),
        },
        None => {
            errors.at(sig.paren_token.span.join(), usage.clone());
            None
        }
    };
    let state = match inputs.next() {
        None => None,
        Some(syn::FnArg::Typed(arg)) => match ctx_state(&arg.ty) {
            Ok(state) => Some(state),
            Err(()) => {
                errors.spanned(
                    &arg.ty,
                    format!(
                        "the second argument of a handler is its context, `Ctx<'_, State>`, not `{}`",
                        arg.ty.to_token_stream()
                    ),
                );
                None
            }
        },
        Some(other) => {
            errors.spanned(other, usage.clone());
            None
        }
    };
    let extra: Vec<_> = inputs.collect();
    if let Some(first) = extra.first() {
        errors.spanned(first, usage);
    }
    let ret = match &sig.output {
        syn::ReturnType::Default => syn::parse_quote!(()),
        syn::ReturnType::Type(_, ty) => (**ty).clone(),
    };
    Some(Signature { event: event?, state, ret })
}

/// The state type of `Ctx<'_, S>` (or `()` for a bare `Ctx`).
fn ctx_state(ty: &syn::Type) -> Result<syn::Type, ()> {
    let syn::Type::Path(path) = ty else { return Err(()) };
    let last = path.path.segments.last().ok_or(())?;
    if last.ident != "Ctx" {
        return Err(());
    }
    match &last.arguments {
        syn::PathArguments::None => Ok(syn::parse_quote!(())),
        syn::PathArguments::AngleBracketed(a) => {
            let types: Vec<_> = a
                .args
                .iter()
                .filter_map(|g| match g {
                    syn::GenericArgument::Type(t) => Some(t.clone()),
                    _ => None,
                })
                .collect();
            match types.as_slice() {
                [] => Ok(syn::parse_quote!(())),
                [one] => Ok(one.clone()),
                _ => Err(()),
            }
        }
        syn::PathArguments::Parenthesized(_) => Err(()),
    }
}

/// The module holding the marker type of a handler: `__eda_handler_<name>`.
fn marker_module(func: &syn::ItemFn) -> syn::Ident {
    format_ident!("__eda_handler_{}", func.sig.ident.unraw())
}

/// The marker type `name` that stands for the handler in `Registry::builder().handler::<name>()`
/// and `#[compensates(name)]`. It lives in a module of its own and comes into the function's
/// module by a glob import, which any item of the same name (`mod shipping` beside
/// `fn shipping`) shadows without a conflict, as plain Rust allows those two.
fn marker(func: &syn::ItemFn) -> TokenStream {
    let (fn_name, vis, module) = (&func.sig.ident, &func.vis, marker_module(func));
    quote! {
        #[doc(hidden)]
        #[allow(non_snake_case)]
        #vis mod #module {
            #[allow(non_camel_case_types, dead_code)]
            pub struct #fn_name {}
        }
        #[doc(hidden)]
        #[allow(unused_imports)]
        #vis use #module::*;
    }
}

/// What a handler that did not compile still defines.
fn stub(func: &syn::ItemFn, p: &TokenStream) -> TokenStream {
    let (fn_name, module, marker) = (&func.sig.ident, marker_module(func), marker(func));
    quote! {
        #marker
        const _: () = {
            #[automatically_derived]
            impl #p::Handler for #module::#fn_name {
                fn descriptor() -> &'static #p::HandlerDescriptor {
                    #p::panic!("this handler did not compile")
                }
            }
        };
    }
}

fn generate(func: &syn::ItemFn, args: &Args, sig: &Signature, p: &TokenStream) -> TokenStream {
    let fn_name = &func.sig.ident;
    let module = marker_module(func);
    let marker = marker(func);
    // A raw identifier (`r#return`) is the handler `return`.
    let name = args.name.as_ref().map(syn::LitStr::value).unwrap_or_else(|| fn_name.unraw().to_string());
    let group = args.group.as_ref().map(syn::LitStr::value).unwrap_or_default();
    let Signature { event, ret, .. } = sig;
    let state: syn::Type = sig.state.clone().unwrap_or_else(|| syn::parse_quote!(()));

    let call = if sig.state.is_some() {
        quote_spanned!(fn_name.span()=> #p::Box::pin(#fn_name(event, cx)))
    } else {
        quote_spanned!(fn_name.span()=> { let _ = cx; #p::Box::pin(#fn_name(event)) })
    };

    let topic_check = args.topic.as_ref().map(|topic| {
        let message = format!(
            "`#[handler(topic = \"{}\")]` is not the topic `{}` is bound to: drop `topic = …` or write the topic given in the event's `#[event(topic = …)]`",
            topic.value(),
            event.to_token_stream().to_string().replace(' ', ""),
        );
        quote_spanned! {topic.span()=>
            const _: () = if !#p::str_eq(<<__EdaHandlerFn as #p::HandlerFn>::Event as #p::Event>::INFO.topic, #topic) {
                #p::panic!(#message)
            };
        }
    });

    let compensates = match &args.compensates {
        Some(step) => quote_spanned!(step.span()=> #p::Some(<#step as #p::Handler>::descriptor)),
        None => quote!(#p::None),
    };

    let (idempotency, dedupe_fn) = match (&args.idempotent, &args.dedupe_key) {
        (Some(b), _) if !b.value => (quote!(#p::Idempotency::Off), quote!()),
        (_, Some(field)) => (
            quote!(#p::Idempotency::Key(__eda_dedupe_key)),
            quote_spanned! {field.span()=>
                fn __eda_dedupe_key(envelope: &#p::Envelope) -> #p::Result<#p::String, #p::CodecError> {
                    let event: #event = #p::decode(envelope)?;
                    #p::Ok(#p::ToString::to_string(&event.#field))
                }
            },
        ),
        _ => (quote!(#p::Idempotency::EventId), quote!()),
    };
    let option = |v: Option<TokenStream>| v.map_or_else(|| quote!(#p::None), |v| quote!(#p::Some(#v)));
    let concurrency = option(args.concurrency.map(|n| quote!(#n)));
    let max_attempts = option(args.max_attempts.map(|n| quote!(#n)));

    let event_type = quote_spanned!(event.span()=> type Event = #event;);
    let state_type = quote_spanned!(state.span()=> type State = #state;);
    let output_type = quote_spanned!(ret.span()=> type Output = #ret;);

    // The function's types are named only by a type private to this block: a `pub` handler may
    // take crate-private events, state and errors, as a plain `pub fn` may.
    quote! {
        #marker

        const _: () = {
            #topic_check
            #dedupe_fn

            #[allow(non_camel_case_types)]
            struct __EdaHandlerFn;

            #[automatically_derived]
            impl #p::HandlerFn for __EdaHandlerFn {
                #event_type
                #state_type
                #output_type
                fn call<'a>(event: Self::Event, cx: #p::Ctx<'a, Self::State>) -> #p::BoxFuture<'a, Self::Output> {
                    #call
                }
            }

            static __EDA_HANDLER: #p::HandlerDescriptor = #p::describe::<__EdaHandlerFn>(#p::HandlerAttrs {
                name: #name,
                module: #p::module_path!(),
                group: #group,
                compensates: #compensates,
                idempotency: #idempotency,
                concurrency: #concurrency,
                max_attempts: #max_attempts,
            });

            #[automatically_derived]
            impl #p::Handler for #module::#fn_name {
                fn descriptor() -> &'static #p::HandlerDescriptor {
                    &__EDA_HANDLER
                }
            }

            #p::inventory::submit! { #p::HandlerRegistration(&__EDA_HANDLER) }
        };
    }
}
