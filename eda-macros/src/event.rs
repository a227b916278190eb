//! `#[event(topic = "…", key = field, name = "…", version = N)]`.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};

use crate::attr::{self, Errors};

const TOPIC: &str = "topic";
const KEY: &str = "key";
const NAME: &str = "name";
const VERSION: &str = "version";
const CRATE: &str = "crate";
const KEYS: &[&str] = &[TOPIC, KEY, NAME, VERSION, CRATE];

#[derive(Default)]
struct Args {
    topic: Option<syn::LitStr>,
    key: Option<syn::Ident>,
    name: Option<syn::LitStr>,
    version: Option<u32>,
    krate: Option<syn::Path>,
}

pub fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let parsed = match syn::parse2::<syn::DeriveInput>(item.clone()) {
        Ok(d) => d,
        Err(_) => {
            errors.at(Span::call_site(), "`#[event]` goes on a struct or an enum");
            let e = errors.to_compile_errors();
            return quote!(#item #e);
        }
    };
    let args = parse(args, &mut errors);
    check(&parsed, &args, &mut errors);

    let p = crate::paths::private(args.krate.as_ref()).unwrap_or_else(|e| {
        errors.push(e);
        quote!(::eda::__private)
    });
    let ident = &parsed.ident;
    // On errors, still implement `Event` with what is known, so uses of the type elsewhere do
    // not add a cascade of errors to the real one.
    let topic = args.topic.as_ref().map(syn::LitStr::value).unwrap_or_default();
    // A raw identifier (`r#type`) names the type `type` on the wire.
    let type_name = syn::ext::IdentExt::unraw(ident).to_string();
    let name = args.name.as_ref().map(syn::LitStr::value).unwrap_or_else(|| type_name.clone());
    let version = args.version.unwrap_or(1);
    let ce_type = format!("{name}.v{version}");
    let key = match (&args.key, &parsed.data) {
        (Some(field), syn::Data::Struct(_)) if errors.is_empty() => {
            quote_spanned!(field.span()=> #p::Some(#p::ToString::to_string(&self.#field)))
        }
        _ => quote!(#p::None),
    };
    let (impl_generics, ty_generics, where_clause) = parsed.generics.split_for_impl();
    let impl_header =
        quote_spanned!(ident.span()=> impl #impl_generics #p::Event for #ident #ty_generics #where_clause);
    let compile_errors = errors.to_compile_errors();
    if !parsed.generics.params.is_empty() {
        // No impl can be right for a generic type; one would only add errors about `T`.
        return quote!(#item #compile_errors);
    }
    quote! {
        #item
        #compile_errors
        const _: () = {
            #[automatically_derived]
            #impl_header {
                const INFO: #p::EventInfo = #p::EventInfo {
                    name: #name,
                    version: #version,
                    ce_type: #ce_type,
                    topic: #topic,
                    path: #p::concat!(#p::module_path!(), "::", #type_name),
                };
                fn key(&self) -> #p::Option<#p::String> {
                    #key
                }
            }
        };
    }
}

fn parse(args: TokenStream, errors: &mut Errors) -> Args {
    let mut out = Args::default();
    attr::parse_args(args, "event", KEYS, errors, |key, meta| {
        match key {
            TOPIC => out.topic = Some(attr::lit_str(meta)?),
            KEY => {
                out.key =
                    Some(attr::ident(meta, "the name of the field that holds the partition key: `key = order_id`")?)
            }
            NAME => out.name = Some(attr::lit_str(meta)?),
            VERSION => {
                let (v, span) = attr::int::<u32>(meta, "a version number: `version = 2`")?;
                if v == 0 {
                    return Err(syn::Error::new(span, "versions start at 1"));
                }
                out.version = Some(v);
            }
            _ => out.krate = Some(attr::crate_path(meta)?),
        }
        Ok(())
    });
    out
}

fn check(item: &syn::DeriveInput, args: &Args, errors: &mut Errors) {
    match &args.topic {
        Some(topic) => attr::check_name(topic, "topic", errors),
        None => errors.at(
            Span::call_site(),
            "`#[event]` needs the topic the event is published on: `#[event(topic = \"orders\")]`",
        ),
    }
    if let Some(name) = &args.name {
        attr::check_name(name, "event", errors);
    }
    if !item.generics.params.is_empty() {
        errors.spanned(&item.generics, "an event cannot be generic: its type name and topic are fixed on the wire");
    }
    if let syn::Data::Union(u) = &item.data {
        errors.spanned(u.union_token, "`#[event]` goes on a struct or an enum, not a union");
    }
    if let Some(key) = &args.key {
        match &item.data {
            syn::Data::Struct(s) => {
                let named = matches!(s.fields, syn::Fields::Named(_));
                let found = s.fields.iter().any(|f| f.ident.as_ref() == Some(key));
                if !named {
                    errors.spanned(key, "`key = …` names a field, and this struct has no named fields");
                } else if !found {
                    let fields: Vec<_> =
                        s.fields.iter().filter_map(|f| f.ident.as_ref()).map(|f| format!("`{f}`")).collect();
                    errors.spanned(
                        key,
                        format!(
                            "`{}` has no field `{key}`: `key = …` names the field that holds the partition key (one of {})",
                            item.ident,
                            fields.join(", ")
                        ),
                    );
                }
            }
            _ => errors.spanned(key, "`key = …` is for structs; an enum event has no partition key"),
        }
    }
}
