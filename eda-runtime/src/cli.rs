//! Commands an application binary offers its operators, on the same registry, state and
//! transport as the service:
//!
//! ```text
//! <app> dlq list [GROUP] [--after ID] [--limit N]
//!                              dead letters, oldest first, 100 at a time
//! <app> dlq show ID            one dead letter, with its envelope
//! <app> dlq replay ID [--force]  hand it to its group again (guards apply unless --force)
//! <app> dlq purge ID           drop it
//! <app> group retire GROUP     forget a group whose handlers are gone (SQL log)
//! <app> lag                    how far each consumer group is behind, per topic
//! <app> trace CORRELATION-ID   one saga: its events by cause, and who handled each
//! ```
//!
//! ```no_run
//! # async fn service() -> eda::RuntimeBuilder { eda::Runtime::from_registry().transport_url("sqlite://app.db") }
//! # #[tokio::main] async fn main() -> eda::Result<()> {
//! if let Some(command) = eda::cli::Command::from_args(std::env::args()) {
//!     let command = command.map_err(eda::Error::Config)?;
//!     print!("{}", eda::cli::run(service().await, command).await?);
//!     return Ok(());
//! }
//! // … otherwise run the service
//! # Ok(()) }
//! ```

use std::fmt::Write as _;
use std::time::SystemTime;

use eda_core::{EventId, Page, SagaEvent, StoredDeadLetter};

use crate::{Error, Replay, Result, RuntimeBuilder};

/// One operator command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `dlq list [GROUP] [--after ID] [--limit N]`
    DlqList {
        /// Only this group's.
        group: Option<String>,
        /// Which page (the first 100 by default).
        page: Page,
    },
    /// `dlq show ID`
    DlqShow {
        /// The dead letter.
        id: u64,
    },
    /// `dlq replay ID [--force]`
    DlqReplay {
        /// The dead letter.
        id: u64,
        /// Bypass the guard of the handler that gave up.
        force: bool,
    },
    /// `dlq purge ID`
    DlqPurge {
        /// The dead letter.
        id: u64,
    },
    /// `group retire GROUP`
    GroupRetire {
        /// The group no handler consumes any more.
        group: String,
    },
    /// `lag`
    Lag,
    /// `trace CORRELATION-ID`
    Trace {
        /// The saga's correlation id.
        correlation: String,
    },
}

const USAGE: &str = "usage: dlq list [GROUP] [--after ID] [--limit N] | dlq show ID | dlq replay ID [--force] | dlq purge ID | group retire GROUP | lag | trace CORRELATION-ID";

impl Command {
    /// The command in a program's arguments (the program's name first): `None` when they are
    /// not an eda command, an error saying what to write when they are a malformed one.
    pub fn from_args<I: IntoIterator<Item = String>>(args: I) -> Option<std::result::Result<Self, String>> {
        let args: Vec<String> = args.into_iter().skip(1).collect();
        let (first, rest) = args.split_first()?;
        match (first.as_str(), rest) {
            ("lag", []) => return Some(Ok(Command::Lag)),
            ("trace", [correlation]) => return Some(Ok(Command::Trace { correlation: correlation.clone() })),
            ("group", [retire, group]) if retire == "retire" => {
                return Some(Ok(Command::GroupRetire { group: group.clone() }))
            }
            ("lag" | "trace" | "group", _) => return Some(Err(USAGE.to_owned())),
            ("dlq", _) => {}
            _ => return None,
        }
        let id = |s: Option<&String>| -> std::result::Result<u64, String> {
            let s = s.ok_or_else(|| format!("a dead letter id is missing; {USAGE}"))?;
            s.parse().map_err(|_| format!("`{s}` is not a dead letter id (a number from `dlq list`); {USAGE}"))
        };
        if rest.first().is_some_and(|c| c == "list") {
            return Some(list(&rest[1..]));
        }
        let rest: Vec<&String> = rest.iter().collect();
        Some(match rest.as_slice() {
            [cmd, n] if *cmd == "show" => id(Some(n)).map(|id| Command::DlqShow { id }),
            [cmd, n] if *cmd == "replay" => id(Some(n)).map(|id| Command::DlqReplay { id, force: false }),
            [cmd, n, f] if *cmd == "replay" && *f == "--force" => {
                id(Some(n)).map(|id| Command::DlqReplay { id, force: true })
            }
            [cmd, n] if *cmd == "purge" => id(Some(n)).map(|id| Command::DlqPurge { id }),
            _ => Err(USAGE.to_owned()),
        })
    }
}

/// `dlq list`'s arguments: a group, `--after ID`, `--limit N`, in any order.
fn list(args: &[String]) -> std::result::Result<Command, String> {
    let (mut group, mut page) = (None, Page::default());
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut number = |flag: &str| -> std::result::Result<u64, String> {
            let value = args.next().ok_or_else(|| format!("`{flag}` needs a number; {USAGE}"))?;
            value.parse().map_err(|_| format!("`{flag} {value}`: `{value}` is not a number; {USAGE}"))
        };
        match arg.as_str() {
            "--after" => page.after = number("--after")?,
            "--limit" => page.limit = usize::try_from(number("--limit")?.max(1)).unwrap_or(usize::MAX),
            flag if flag.starts_with("--") => return Err(format!("`dlq list` takes no `{flag}`; {USAGE}")),
            g if group.is_none() => group = Some(g.to_owned()),
            _ => return Err(USAGE.to_owned()),
        }
    }
    Ok(Command::DlqList { group, page })
}

/// Runs `command` on the runtime `builder` describes, with no consumers running, and returns
/// what to print.
pub async fn run(builder: RuntimeBuilder, command: Command) -> Result<String> {
    let runtime = builder.without_consumers().start().await?;
    let out = match command {
        Command::DlqList { group, page } => {
            let letters = runtime.dead_letter_page(group.as_deref(), page).await?;
            let mut out = table(&letters);
            if let (true, Some(last)) = (letters.len() >= page.limit, letters.last()) {
                let group = group.as_deref().map(|g| format!(" {g}")).unwrap_or_default();
                let _ = writeln!(out, "more: dlq list{group} --after {} --limit {}", last.id, page.limit);
            }
            out
        }
        Command::GroupRetire { group } => {
            let removed = runtime.retire_group(&group).await?;
            format!("group `{group}` retired: {removed} records removed; its dead letters stay (`dlq list {group}`)\n")
        }
        Command::DlqShow { id } => match runtime.dead_letter(id).await? {
            Some(d) => show(&d)?,
            None => return Err(Error::Config(format!("there is no dead letter {id}; `dlq list` shows them"))),
        },
        Command::DlqReplay { id, force } => match runtime.replay(id, force).await? {
            Replay::Handled => format!("dead letter {id} was handled and removed\n"),
            Replay::FailedAgain(error) => format!("dead letter {id} failed again and stays: {error}\n"),
            Replay::Busy => format!("dead letter {id} is being handled elsewhere; try again shortly\n"),
        },
        Command::Lag => {
            let lag = runtime.lag().await?;
            let mut out = format!("{:<24} {:<24} {:>10}\n", "GROUP", "TOPIC", "LAG");
            for ((group, topic), n) in lag {
                let _ = writeln!(out, "{group:<24} {topic:<24} {n:>10}");
            }
            out
        }
        Command::Trace { correlation } => saga(&runtime.saga(&correlation.as_str().into()).await?),
        Command::DlqPurge { id } => {
            if runtime.purge(id).await? {
                format!("dead letter {id} removed\n")
            } else {
                return Err(Error::Config(format!("there is no dead letter {id}; `dlq list` shows them")));
            }
        }
    };
    runtime.shutdown().await;
    Ok(out)
}

fn ago(at: SystemTime) -> String {
    let secs = SystemTime::now().duration_since(at).map_or(0, |d| d.as_secs());
    match secs {
        0..=59 => format!("{secs}s ago"),
        60..=3599 => format!("{}m ago", secs / 60),
        3600..=86_399 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86_400),
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

fn table(dead: &[StoredDeadLetter]) -> String {
    if dead.is_empty() {
        return "no dead letters\n".to_owned();
    }
    let mut out = format!(
        "{:>5}  {:<20} {:<24} {:>8}  {:<32} {:<10} {}\n",
        "ID", "GROUP", "TYPE", "ATTEMPTS", "HANDLER", "WHEN", "ERROR"
    );
    for d in dead {
        let _ = writeln!(
            out,
            "{:>5}  {:<20} {:<24} {:>8}  {:<32} {:<10} {}",
            d.id,
            clip(&d.group, 20),
            clip(&d.letter.envelope.ty, 24),
            d.letter.attempts,
            clip(d.letter.reason.handler.as_deref().unwrap_or("-"), 32),
            ago(d.letter.at),
            clip(&d.letter.reason.error, 80),
        );
    }
    out
}

/// A saga as a tree: each event under the event whose handling emitted it.
fn saga(events: &[SagaEvent]) -> String {
    if events.is_empty() {
        return "no events with that correlation id\n".to_owned();
    }
    let mut out = String::new();
    let known = |id: &EventId| events.iter().any(|e| e.envelope.id == *id);
    for root in events.iter().filter(|e| e.envelope.causation_id.is_none_or(|c| !known(&c))) {
        saga_event(events, root, 0, &mut out);
    }
    out
}

fn saga_event(events: &[SagaEvent], event: &SagaEvent, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth);
    let e = &event.envelope;
    let times =
        if event.publications > 1 { format!(", published {} times", event.publications) } else { String::new() };
    let _ = writeln!(out, "{pad}{}  {}  from {}{times}", e.ty, e.id, e.source);
    for h in &event.handled_by {
        let _ =
            writeln!(out, "{pad}  handled by {}/{}  {}", h.group, h.handler, humantime::format_rfc3339_millis(h.at));
    }
    for child in events.iter().filter(|c| c.envelope.causation_id == Some(e.id)) {
        saga_event(events, child, depth + 1, out);
    }
}

fn show(d: &StoredDeadLetter) -> Result<String> {
    let e = &d.letter.envelope;
    let data = String::from_utf8_lossy(&e.data);
    let mut out = String::new();
    let _ = writeln!(out, "dead letter {} of group {}", d.id, d.group);
    let _ = writeln!(out, "  handler      {}", d.letter.reason.handler.as_deref().unwrap_or("-"));
    let _ = writeln!(out, "  error        {}", d.letter.reason.error);
    let kind = if d.letter.reason.permanent { "permanent" } else { "retries exhausted" };
    let _ = writeln!(out, "  attempts     {} ({kind})", d.letter.attempts);
    let _ = writeln!(out, "  when         {}", humantime::format_rfc3339_seconds(d.letter.at));
    let _ = writeln!(out, "  event id     {}", e.id);
    let _ = writeln!(out, "  type         {}", e.ty);
    let _ = writeln!(out, "  topic / key  {} / {}", e.topic, e.subject.as_deref().unwrap_or("-"));
    let _ = writeln!(out, "  source       {}", e.source);
    let _ = writeln!(out, "  correlation  {}", e.correlation_id);
    let _ = writeln!(out, "  causation    {}", e.causation_id.map_or("-".to_owned(), |c| c.to_string()));
    let _ = writeln!(out, "  data         {}", clip(&data, 2000));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Option<std::result::Result<Command, String>> {
        Command::from_args(std::iter::once("app".to_owned()).chain(s.split_whitespace().map(str::to_owned)))
    }

    #[test]
    fn commands_parse_and_mistakes_say_what_to_write() {
        assert_eq!(parse("serve"), None);
        assert_eq!(parse("lag"), Some(Ok(Command::Lag)));
        assert_eq!(parse("trace c-1"), Some(Ok(Command::Trace { correlation: "c-1".into() })));
        assert!(parse("trace").is_some_and(|r| r.is_err()));
        assert_eq!(parse(""), None);
        let first = Page::default();
        assert_eq!(parse("dlq list"), Some(Ok(Command::DlqList { group: None, page: first })));
        assert_eq!(
            parse("dlq list billing"),
            Some(Ok(Command::DlqList { group: Some("billing".into()), page: first }))
        );
        assert_eq!(
            parse("dlq list --after 40 billing --limit 20"),
            Some(Ok(Command::DlqList { group: Some("billing".into()), page: Page { after: 40, limit: 20 } }))
        );
        assert!(parse("dlq list --limit x").is_some_and(|r| r.is_err_and(|e| e.contains("not a number"))));
        assert_eq!(parse("group retire old-billing"), Some(Ok(Command::GroupRetire { group: "old-billing".into() })));
        assert!(parse("group drop x").is_some_and(|r| r.is_err()));
        assert_eq!(parse("dlq replay 7 --force"), Some(Ok(Command::DlqReplay { id: 7, force: true })));
        assert_eq!(parse("dlq purge 3"), Some(Ok(Command::DlqPurge { id: 3 })));
        let err = parse("dlq show seven").and_then(Result::err).unwrap_or_default();
        assert!(err.contains("`seven` is not a dead letter id"), "{err}");
        let err = parse("dlq frobnicate").and_then(Result::err).unwrap_or_default();
        assert!(err.starts_with("usage: dlq list"), "{err}");
    }
}
