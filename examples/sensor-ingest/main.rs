//! A sensor gateway writing readings through a spool: readings go to an on-disk log first, so
//! the gateway keeps accepting them while the service is down, and every reading arrives
//! exactly once when it is back.
//!
//! ```sh
//! cargo run --example sensor-ingest -- sensor-1 2000     # 2,000 readings, 10 ms apart
//! # stop `make run` for a few seconds meanwhile, start it again: the count still reaches 2,000
//! ```
//!
//! The spool lives in `$TMPDIR/sensor-ingest-<sensor>` (`SENSOR_SPOOL_DIR` elsewhere); a run
//! first sends what an earlier, interrupted run left there, then continues after the highest
//! sequence number stored. `EVENTJOURNAL_URL` points it at another server.

use std::time::Duration;

use eventjournal_client::spool::{Spool, SpoolOptions};
use eventjournal_client::{Client, Event, Payload};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sensor = args.first().cloned().unwrap_or_else(|| "sensor-1".into());
    let readings: i64 = args.get(1).map(|n| n.parse()).transpose()?.unwrap_or(2_000);
    let url = std::env::var("EVENTJOURNAL_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let client = Client::builder(url).connect_lazy()?;
    let directory = std::env::var_os("SENSOR_SPOOL_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join(format!("sensor-ingest-{sensor}")));
    let spool = Spool::open(&directory, client.clone(), SpoolOptions::default()).await?;
    // What a previous run left in the spool goes first; then continue after it.
    spool.drained().await;
    let first = client.highest_sequence_nr(&sensor).await.unwrap_or(0) + 1;
    for n in first..first + readings {
        let celsius = 20.0 + (n as f64 / 10.0).sin();
        let reading = Event::new(
            &sensor,
            n,
            Payload::new(format!("{celsius:.2}"), 1, "Celsius"),
        );
        spool.send(vec![reading]).await?;
        if n % 100 == 0 {
            println!(
                "{n} readings taken, {} bytes waiting in the spool",
                spool.pending_bytes()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    spool.drained().await;
    println!(
        "all sent: {sensor} holds {} readings ({} refused)",
        client.highest_sequence_nr(&sensor).await?,
        spool.rejected()
    );
    Ok(())
}
