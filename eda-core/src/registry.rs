//! The registry of handlers linked into a binary, its start-up checks and its choreography
//! graph.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use crate::event::{EmittedEvent, Event, EventInfo};
use crate::handler::{Handler, HandlerDescriptor, HandlerRegistration};

/// Every handler a runtime may run, and the event types application code publishes.
///
/// ```
/// use eda_core::{event, handler, Registry};
/// use serde::{Deserialize, Serialize};
///
/// #[event(topic = "orders")]
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced { id: u32 }
///
/// #[handler(group = "mailer")]
/// async fn send_mail(_ev: OrderPlaced) {}
///
/// let registry = Registry::builder().handler::<send_mail>().publishes::<OrderPlaced>().build();
/// let report = registry.validate();
/// assert!(report.is_ok(), "{report}");
/// assert!(registry.mermaid().contains("send_mail"));
/// ```
#[derive(Clone, Debug, Default)]
pub struct Registry {
    handlers: Vec<&'static HandlerDescriptor>,
    published: Vec<EventInfo>,
}

/// Builds a [`Registry`] explicitly, for targets where link-time collection is unavailable or
/// to run a subset of the handlers.
#[derive(Debug, Default)]
pub struct RegistryBuilder {
    registry: Registry,
}

impl RegistryBuilder {
    /// Adds a handler, named by its function's name.
    pub fn handler<H: Handler>(mut self) -> Self {
        self.registry.add(H::descriptor());
        self
    }

    /// Adds a handler descriptor.
    pub fn descriptor(mut self, descriptor: &'static HandlerDescriptor) -> Self {
        self.registry.add(descriptor);
        self
    }

    /// Declares that application code publishes `E` (so handlers of `E` are reachable).
    pub fn publishes<E: Event>(mut self) -> Self {
        self.registry.add_published(E::INFO);
        self
    }

    /// The registry.
    pub fn build(self) -> Registry {
        self.registry
    }
}

impl Registry {
    /// Every `#[handler]` linked into this binary.
    pub fn from_inventory() -> Self {
        let mut registry = Self::default();
        for HandlerRegistration(d) in inventory::iter::<HandlerRegistration> {
            registry.add(d);
        }
        // Link order is not stable; keep reports and graphs deterministic.
        registry.handlers.sort_by_key(|d| (d.group, d.name, d.module));
        registry
    }

    /// An empty registry to add handlers to.
    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    fn add(&mut self, d: &'static HandlerDescriptor) {
        if !self.handlers.iter().any(|h| std::ptr::eq(*h, d)) {
            self.handlers.push(d);
        }
    }

    /// Declares that application code publishes an event type.
    pub fn add_published(&mut self, info: EventInfo) {
        if !self.published.contains(&info) {
            self.published.push(info);
        }
    }

    /// Keeps only the handlers of the given consumer groups (a service runs its own groups).
    pub fn retain_groups(&mut self, groups: &[&str]) {
        self.handlers.retain(|h| groups.contains(&h.group));
    }

    /// The handlers.
    pub fn handlers(&self) -> &[&'static HandlerDescriptor] {
        &self.handlers
    }

    /// The event types application code is declared to publish.
    pub fn published(&self) -> &[EventInfo] {
        &self.published
    }

    /// The handlers by consumer group.
    pub fn groups(&self) -> BTreeMap<&'static str, Vec<&'static HandlerDescriptor>> {
        let mut groups: BTreeMap<_, Vec<_>> = BTreeMap::new();
        for h in &self.handlers {
            groups.entry(h.group).or_default().push(*h);
        }
        groups
    }

    /// The (group, topic) subscriptions the handlers need.
    pub fn subscriptions(&self) -> BTreeSet<(&'static str, &'static str)> {
        self.handlers.iter().map(|h| (h.group, h.topic())).collect()
    }

    /// Every event type the handlers emit, with the handlers that emit it.
    fn emitters(&self) -> HashMap<&'static str, Vec<(&'static HandlerDescriptor, EmittedEvent)>> {
        let mut by_type: HashMap<_, Vec<_>> = HashMap::new();
        for h in &self.handlers {
            for e in (h.emits)() {
                by_type.entry(e.info.ce_type).or_default().push((*h, e));
            }
        }
        by_type
    }

    /// Two Rust types claiming one CloudEvents `type` (two `Cancelled` structs in two modules)
    /// would each be taken for the other on the wire: handlers of both would run on either.
    fn check_event_types(
        &self,
        emitters: &HashMap<&'static str, Vec<(&'static HandlerDescriptor, EmittedEvent)>>,
        report: &mut Report,
    ) {
        let handled = self.handlers.iter().map(|h| h.event);
        let emitted = emitters.values().flatten().map(|(_, e)| e.info);
        let mut paths: HashMap<&str, Vec<&str>> = HashMap::new();
        for info in handled.chain(emitted).chain(self.published.iter().copied()) {
            let known = paths.entry(info.ce_type).or_default();
            if !known.contains(&info.path) {
                known.push(info.path);
            }
        }
        let mut clashes: Vec<_> = paths.into_iter().filter(|(_, p)| p.len() > 1).collect();
        clashes.sort_unstable();
        for (ty, mut types) in clashes {
            types.sort_unstable();
            report.error(format!(
                "{} all claim the event type `{ty}`: each would be taken for the other on the wire; give each a name of its own, for example `#[event(name = \"Orders{}\", …)]` on `{}`",
                types.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(" and "),
                ty.split('.').next().unwrap_or(ty),
                types[0],
            ));
        }
    }

    /// Checks the choreography: duplicate handler names in a group, handlers nothing can
    /// trigger, failure events after a step with effects that no compensator of that step
    /// handles, emitted events nobody handles.
    pub fn validate(&self) -> Report {
        let mut report = Report::default();
        let emitters = self.emitters();

        let mut names: HashMap<(&str, &str), Vec<&HandlerDescriptor>> = HashMap::new();
        for h in &self.handlers {
            names.entry((h.group, h.name)).or_default().push(h);
        }
        for ((group, name), hs) in &names {
            if hs.len() > 1 {
                let modules: Vec<_> = hs.iter().map(|h| h.module).collect();
                report.error(format!(
                    "group `{group}` has {} handlers named `{name}` (in {}): rename one, or give it `#[handler(name = \"…\")]`",
                    hs.len(),
                    modules.join(", ")
                ));
            }
        }

        self.check_event_types(&emitters, &mut report);

        for h in &self.handlers {
            let emitted = emitters.contains_key(h.event.ce_type);
            let published = self.published.iter().any(|p| p.ce_type == h.event.ce_type);
            if !emitted && !published {
                report.warning(format!(
                    "handler `{}` handles `{}` on topic `{}`, which no handler emits; if application code publishes it, declare that with `.publishes::<{}>()`",
                    h.qualified_name(), h.event.ce_type, h.event.topic, h.event.name
                ));
            }
        }

        for (ty, sources) in &emitters {
            if !self.handlers.iter().any(|h| h.event.ce_type == *ty) {
                let by: Vec<_> = sources.iter().map(|(h, _)| h.qualified_name()).collect();
                report.warning(format!(
                    "`{ty}` is emitted by {} but no handler in this registry handles it",
                    by.join(", ")
                ));
            }
        }

        self.check_compensation(&emitters, &mut report);
        report
    }

    /// Every failure event F emitted by a handler H needs, for each step U upstream of H whose
    /// success had effects, a compensator of U that handles F.
    fn check_compensation(
        &self,
        emitters: &HashMap<&'static str, Vec<(&'static HandlerDescriptor, EmittedEvent)>>,
        report: &mut Report,
    ) {
        for failing in &self.handlers {
            for failure in (failing.emits)().into_iter().filter(|e| e.failure) {
                for step in self.upstream_steps(failing, emitters) {
                    let compensated = self.handlers.iter().any(|c| {
                        c.event.ce_type == failure.info.ce_type
                            && c.compensates.is_some_and(|s| std::ptr::eq(s(), step))
                    });
                    if !compensated {
                        report.error(format!(
                            "`{}` (emitted by `{}` on failure) follows step `{}`, whose effects nothing undoes: add `#[compensates({})]` to a handler of `{}`",
                            failure.info.ce_type,
                            failing.qualified_name(),
                            step.qualified_name(),
                            step.name,
                            failure.info.name,
                        ));
                    }
                }
            }
        }
        for c in &self.handlers {
            let Some(step) = c.compensates.map(|s| s()) else { continue };
            if !self.handlers.iter().any(|h| std::ptr::eq(*h, step)) {
                report.warning(format!(
                    "`{}` compensates `{}`, which is not in this registry",
                    c.qualified_name(),
                    step.qualified_name()
                ));
            }
        }
    }

    /// The handlers whose successful events lead, directly or transitively, to `handler`.
    fn upstream_steps(
        &self,
        handler: &HandlerDescriptor,
        emitters: &HashMap<&'static str, Vec<(&'static HandlerDescriptor, EmittedEvent)>>,
    ) -> Vec<&'static HandlerDescriptor> {
        let mut found: Vec<&'static HandlerDescriptor> = Vec::new();
        let mut todo = vec![handler.event.ce_type];
        let mut seen = BTreeSet::new();
        while let Some(ty) = todo.pop() {
            if !seen.insert(ty) {
                continue;
            }
            for (h, e) in emitters.get(ty).into_iter().flatten() {
                if e.failure || h.compensates.is_some() {
                    continue;
                }
                if !found.iter().any(|f| std::ptr::eq(*f, *h)) {
                    found.push(h);
                }
                todo.push(h.event.ce_type);
            }
        }
        found
    }

    /// The choreography graph as Mermaid text: events (rounded), handlers (boxes, by group),
    /// success and failure edges, and compensation links.
    pub fn mermaid(&self) -> String {
        use fmt::Write as _;
        let mut out = String::from("flowchart LR\n");
        let id = |s: &str| s.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        let mut events: BTreeSet<&str> = BTreeSet::new();
        for h in &self.handlers {
            events.insert(h.event.ce_type);
            for e in (h.emits)() {
                events.insert(e.info.ce_type);
            }
        }
        for e in &events {
            let _ = writeln!(out, "    ev_{}([{}])", id(e), e);
        }
        for (group, hs) in self.groups() {
            let _ = writeln!(out, "    subgraph {}[\"{}\"]", id(group), group);
            for h in hs {
                let _ = writeln!(out, "        h_{}_{}[{}]", id(group), id(h.name), h.name);
            }
            out.push_str("    end\n");
        }
        for h in &self.handlers {
            let node = format!("h_{}_{}", id(h.group), id(h.name));
            let _ = writeln!(out, "    ev_{} --> {node}", id(h.event.ce_type));
            for e in (h.emits)() {
                let arrow = if e.failure { "-. failure .->" } else { "-->" };
                let _ = writeln!(out, "    {node} {arrow} ev_{}", id(e.info.ce_type));
            }
            if let Some(step) = h.compensates.map(|s| s()) {
                let _ = writeln!(out, "    {node} -. compensates .-> h_{}_{}", id(step.group), id(step.name));
            }
        }
        out
    }
}

/// The findings of [`Registry::validate`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Problems that stop the runtime from starting.
    pub errors: Vec<String>,
    /// Problems worth a look that do not stop it.
    pub warnings: Vec<String>,
}

impl Report {
    fn error(&mut self, message: String) {
        self.errors.push(message);
    }
    fn warning(&mut self, message: String) {
        self.warnings.push(message);
    }

    /// True when there are no errors.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.errors {
            writeln!(f, "error: {e}")?;
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        Ok(())
    }
}
