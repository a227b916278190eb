//! Where generated code finds eda: `::eda::__private` for services, `::eda_core::__private` for
//! crates that only depend on the contract, or the path given with `crate = "…"`.

use proc_macro2::TokenStream;
use proc_macro_crate::{crate_name, FoundCrate};
use quote::{format_ident, quote};

pub fn private(override_path: Option<&syn::Path>) -> TokenStream {
    if let Some(path) = override_path {
        return quote!(#path::__private);
    }
    match crate_name("eda-runtime") {
        // The runtime's library is named `eda`; a dependency renamed in Cargo.toml keeps its new name.
        Ok(FoundCrate::Itself) => quote!(::eda::__private),
        Ok(FoundCrate::Name(name)) if name == "eda_runtime" => quote!(::eda::__private),
        Ok(FoundCrate::Name(name)) => {
            let name = format_ident!("{name}");
            quote!(::#name::__private)
        }
        Err(_) => match crate_name("eda-core") {
            Ok(FoundCrate::Itself) => quote!(::eda_core::__private),
            Ok(FoundCrate::Name(name)) => {
                let name = format_ident!("{name}");
                quote!(::#name::__private)
            }
            Err(_) => quote!(::eda::__private),
        },
    }
}
