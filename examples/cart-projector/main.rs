//! A projector over the shopping carts' events (tag `cart`): a running count of items in carts
//! per product, printed as it changes. The totals are stored together with the projection's
//! offset, in one durable-state object (a user-supplied `OffsetStore`), so a restart, or a crash
//! at any moment, resumes exactly where the stored totals are: nothing counted twice, nothing
//! missed.
//!
//! ```sh
//! cargo run --example cart-projector                      # Ctrl-C stops it; run it again
//! cargo run --example shopping-cart -- cart-2 add apple  # in another terminal
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use eventjournal_client::projection::{Committed, OffsetStore, Projection, Source};
use eventjournal_client::{Client, Error, EventEnvelope, Offset, Payload, Result};

type Totals = Arc<Mutex<BTreeMap<String, i64>>>;

/// The offset, the recent events and the totals, as one object: `offset`, then `recent` lines
/// `seq\tpid`, a blank line, then `count\titem` lines.
struct TotalsWithOffset {
    client: Client,
    totals: Totals,
    revision: Mutex<i64>,
}

const OBJECT: &str = "cart-projector|state";

impl OffsetStore for TotalsWithOffset {
    async fn load(&self, _projection: &str) -> Result<Option<Committed>> {
        let stored = self.client.get_object(OBJECT).await?;
        *self.revision.lock().unwrap() = stored.revision;
        let Some(value) = stored.value else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&value.data).into_owned();
        let (head, totals) = text.split_once("\n\n").unwrap_or((&text, ""));
        let mut lines = head.split('\n');
        let offset = Offset(lines.next().unwrap_or_default().to_owned());
        let parse = |line: &str| -> Result<(String, i64)> {
            let (number, name) = line
                .split_once('\t')
                .ok_or_else(|| Error::InvalidArgument(format!("stored line {line:?}")))?;
            let number = number
                .parse()
                .map_err(|_| Error::InvalidArgument(format!("stored line {line:?}")))?;
            Ok((name.to_owned(), number))
        };
        let recent = lines
            .filter(|line| !line.is_empty())
            .map(parse)
            .collect::<Result<_>>()?;
        *self.totals.lock().unwrap() = totals
            .split('\n')
            .filter(|line| !line.is_empty())
            .map(parse)
            .collect::<Result<_>>()?;
        Ok(Some(Committed { offset, recent }))
    }

    async fn save(&self, _projection: &str, committed: &Committed) -> Result<()> {
        let mut text = committed.offset.0.clone();
        for (pid, sequence_nr) in &committed.recent {
            text.push_str(&format!("\n{sequence_nr}\t{pid}"));
        }
        text.push('\n');
        for (item, count) in self.totals.lock().unwrap().iter() {
            text.push_str(&format!("\n{count}\t{item}"));
        }
        let revision = *self.revision.lock().unwrap() + 1;
        self.client
            .upsert_object(
                OBJECT,
                revision,
                Payload::new(text.into_bytes(), 1, "CartTotals"),
                "",
            )
            .await?;
        *self.revision.lock().unwrap() = revision;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("EVENTJOURNAL_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let client = Client::builder(url).connect().await?;
    let totals = Totals::default();
    let store = TotalsWithOffset {
        client: client.clone(),
        totals: totals.clone(),
        revision: Mutex::new(0),
    };
    let counted = totals.clone();
    let projection = Projection::new("cart-projector", Source::Tag("cart".into()))
        .commit_every(10)
        .run_with(client, store, move |envelope: EventEnvelope| {
            let change = match envelope.event.payload.manifest.as_str() {
                "ItemAdded" => 1,
                "ItemRemoved" => -1,
                _ => 0,
            };
            if change != 0 {
                let item = String::from_utf8_lossy(&envelope.event.payload.data).into_owned();
                let mut totals = counted.lock().unwrap();
                *totals.entry(item).or_default() += change;
                println!("{:?}", *totals);
            }
            async { Ok(()) }
        })
        .await?;
    println!("following tag cart (Ctrl-C stops)");
    tokio::signal::ctrl_c().await?;
    projection.stop().await?;
    Ok(())
}
