//! A projector over the shopping carts' events (tag `cart`): a running count of items in carts
//! per product, printed as it changes. Its offset and the totals are stored in the service's
//! durable-state store, so a restart resumes where it stopped, counting nothing twice.
//!
//! ```sh
//! cargo run --example cart-projector                      # Ctrl-C stops it; run it again
//! cargo run --example shopping-cart -- cart-2 add apple  # in another terminal
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use eventjournal_client::projection::{Projection, Source};
use eventjournal_client::{Client, EventEnvelope, Payload};

const TOTALS: &str = "cart-projector|totals";

fn encode(totals: &BTreeMap<String, i64>) -> Payload {
    let text: Vec<String> = totals
        .iter()
        .map(|(item, count)| format!("{count}\t{item}"))
        .collect();
    Payload::new(text.join("\n").into_bytes(), 1, "Totals")
}

fn decode(payload: &Payload) -> BTreeMap<String, i64> {
    String::from_utf8_lossy(&payload.data)
        .split('\n')
        .filter_map(|line| {
            let (count, item) = line.split_once('\t')?;
            Some((item.to_owned(), count.parse().ok()?))
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("EVENTJOURNAL_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let client = Client::builder(url).connect().await?;
    let stored = client.get_object(TOTALS).await?;
    let totals = Arc::new(Mutex::new((
        stored.value.as_ref().map(decode).unwrap_or_default(),
        stored.revision,
    )));
    let writer = client.clone();
    let counted = totals.clone();
    // The totals are stored before the offset is committed (commit_every(1)): a restart
    // re-handles at most the event being handled when it stopped.
    let projection = Projection::new("cart-projector", Source::Tag("cart".into()))
        .commit_every(1)
        .run(client, move |envelope: EventEnvelope| {
            let writer = writer.clone();
            let counted = counted.clone();
            async move {
                let item = String::from_utf8_lossy(&envelope.event.payload.data).into_owned();
                let change = match envelope.event.payload.manifest.as_str() {
                    "ItemAdded" => 1,
                    "ItemRemoved" => -1,
                    _ => return Ok(()),
                };
                let (payload, revision) = {
                    let mut totals = counted.lock().unwrap();
                    *totals.0.entry(item).or_default() += change;
                    totals.1 += 1;
                    println!("{:?}", totals.0);
                    (encode(&totals.0), totals.1)
                };
                writer.upsert_object(TOTALS, revision, payload, "").await
            }
        })
        .await?;
    println!("following tag cart (Ctrl-C stops)");
    tokio::signal::ctrl_c().await?;
    projection.stop().await?;
    Ok(())
}
