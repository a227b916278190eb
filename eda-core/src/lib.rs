//! The contract of eda: events and their envelopes, handler descriptors and the registry,
//! and the traits transports and stores implement.
//!
//! A crate that only defines the events services share depends on this crate alone; services
//! depend on `eda-runtime`, which re-exports everything here.
//!
//! ```
//! use eda_core::{event, Event};
//! use serde::{Deserialize, Serialize};
//!
//! #[event(topic = "payments", key = order_id, version = 2)]
//! #[derive(Serialize, Deserialize)]
//! pub struct PaymentCollected {
//!     pub order_id: String,
//!     pub cents: u64,
//! }
//!
//! assert_eq!(PaymentCollected::INFO.ce_type, "PaymentCollected.v2");
//! assert_eq!(PaymentCollected::topic().name(), "payments");
//! ```

// Generated code names `::eda_core::…`; this lets it do so inside this crate's own doc tests.
extern crate self as eda_core;

pub mod codec;
pub mod envelope;
pub mod error;
pub mod event;
pub mod handler;
pub mod registry;
pub mod store;
pub mod time;
pub mod transport;

pub use eda_macros::{compensates, event, handler};
pub use envelope::{Binding, CorrelationId, Envelope, EventId};
pub use error::{CodecError, EnvelopeError, ErrorClass, HandlerError, StoreError, TransportError};
pub use event::{Emit, EmittedEvent, Event, EventInfo, HandlerReturn, Never, Outcome, PendingEvent, Topic};
pub use handler::{
    Ctx, Handler, HandlerDescriptor, Handling, Idempotency, MissingState, StateInfo, States, Transaction,
};
pub use registry::{Registry, RegistryBuilder, Report};
pub use store::{Claim, GuardKey, Inbox, StepState};
pub use transport::{
    Acker, Commit, DeadLetter, DeadLetterReason, DeadLetterStore, Deliveries, Delivery, Ownership, Page, PartitionLag,
    SagaEvent, SagaHandling, SagaView, Store, StoredDeadLetter, Subscription, Transport, UnitOfWork,
};

/// Not public API: what the macros' generated code names.
#[doc(hidden)]
pub mod __private {
    pub use crate::codec::decode;
    pub use crate::envelope::Envelope;
    pub use crate::error::CodecError;
    pub use crate::event::{Event, EventInfo};
    pub use crate::handler::{
        describe, BoxFuture, Ctx, Handler, HandlerAttrs, HandlerDescriptor, HandlerFn, HandlerRegistration, Idempotency,
    };
    pub use eda_macros::{__compensates, handler};
    pub use inventory;
    pub use serde;
    pub use std::boxed::Box;
    pub use std::option::Option::{self, None, Some};
    pub use std::result::Result::{self, Err, Ok};
    pub use std::string::{String, ToString};
    pub use std::vec::Vec;
    pub use std::{concat, module_path, panic, stringify};

    /// `a == b`, usable in constants: the compile-time topic check of `#[handler(topic)]`.
    pub const fn str_eq(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}
