//! A shopping cart as a persistent actor over eventjournal: each run recovers the cart (latest
//! snapshot plus the events after it), applies one command, and prints the cart.
//!
//! ```sh
//! make run                                               # in another terminal
//! cargo run --example shopping-cart -- cart-1 add apple
//! cargo run --example shopping-cart -- cart-1 add pear
//! cargo run --example shopping-cart -- cart-1 remove apple
//! cargo run --example shopping-cart -- cart-1 show       # recovered: [pear]
//! cargo run --example shopping-cart -- cart-1 checkout
//! ```
//!
//! `EVENTJOURNAL_URL` (default `http://127.0.0.1:50051`) and `EVENTJOURNAL_TOKEN` point it at
//! another server. Snapshots every 3 events; the events before the snapshot kept.

use eventjournal_client::actor::{PersistentActor, ask};
use eventjournal_client::persistent::{Behaviour, Effect, PersistenceSettings};
use eventjournal_client::{Client, Error, Payload, Result};

struct ShoppingCart;

enum Command {
    Add(String),
    Remove(String),
    Checkout,
    Show,
}

enum Event {
    ItemAdded(String),
    ItemRemoved(String),
    CheckedOut,
}

#[derive(Default)]
struct Cart {
    items: Vec<String>,
    checked_out: bool,
}

type Reply = std::result::Result<String, String>;

impl Behaviour for ShoppingCart {
    type Command = Command;
    type Event = Event;
    type State = Cart;
    type Reply = Reply;

    fn command(&self, cart: &Cart, command: Command) -> Effect<Event, Reply> {
        let show = |items: &[String], checked_out| {
            Ok(format!(
                "{items:?}{}",
                if checked_out { " (checked out)" } else { "" }
            ))
        };
        match command {
            Command::Show => Effect::Reply(show(&cart.items, cart.checked_out)),
            _ if cart.checked_out => Effect::Reply(Err("the cart is checked out".into())),
            Command::Add(item) => {
                let mut items = cart.items.clone();
                items.push(item.clone());
                Effect::Persist(vec![Event::ItemAdded(item)], show(&items, false))
            }
            Command::Remove(item) if !cart.items.contains(&item) => {
                Effect::Reply(Err(format!("{item} is not in the cart")))
            }
            Command::Remove(item) => {
                let items: Vec<String> =
                    cart.items.iter().filter(|i| **i != item).cloned().collect();
                Effect::Persist(vec![Event::ItemRemoved(item)], show(&items, false))
            }
            Command::Checkout if cart.items.is_empty() => {
                Effect::Reply(Err("the cart is empty".into()))
            }
            Command::Checkout => Effect::Persist(vec![Event::CheckedOut], show(&cart.items, true)),
        }
    }

    fn apply(cart: &mut Cart, event: &Event) {
        match event {
            Event::ItemAdded(item) => cart.items.push(item.clone()),
            Event::ItemRemoved(item) => cart.items.retain(|i| i != item),
            Event::CheckedOut => cart.checked_out = true,
        }
    }

    fn encode_event(event: &Event) -> Payload {
        let (manifest, item) = match event {
            Event::ItemAdded(item) => ("ItemAdded", item.as_str()),
            Event::ItemRemoved(item) => ("ItemRemoved", item.as_str()),
            Event::CheckedOut => ("CheckedOut", ""),
        };
        Payload::new(item.as_bytes().to_vec(), 1, manifest)
    }

    fn decode_event(payload: &Payload) -> Result<Event> {
        let item = String::from_utf8_lossy(&payload.data).into_owned();
        match payload.manifest.as_str() {
            "ItemAdded" => Ok(Event::ItemAdded(item)),
            "ItemRemoved" => Ok(Event::ItemRemoved(item)),
            "CheckedOut" => Ok(Event::CheckedOut),
            other => Err(Error::InvalidArgument(format!("unknown event {other}"))),
        }
    }

    fn encode_state(cart: &Cart) -> Payload {
        let mut text = if cart.checked_out { "1" } else { "0" }.to_owned();
        for item in &cart.items {
            text.push('\n');
            text.push_str(item);
        }
        Payload::new(text.into_bytes(), 1, "Cart")
    }

    fn decode_state(payload: &Payload) -> Result<Cart> {
        let text = String::from_utf8_lossy(&payload.data).into_owned();
        let mut lines = text.split('\n');
        let checked_out = lines.next() == Some("1");
        Ok(Cart {
            items: lines.map(str::to_owned).collect(),
            checked_out,
        })
    }

    /// Every event is tagged `cart`: the cart-projector example follows it.
    fn tags(_event: &Event) -> Vec<String> {
        vec!["cart".into()]
    }
}

#[tokio::main]
async fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: shopping-cart <cart id> add <item> | remove <item> | checkout | show";
    let (Some(cart_id), Some(verb)) = (args.first(), args.get(1)) else {
        return Err(usage.into());
    };
    let command = match (verb.as_str(), args.get(2)) {
        ("add", Some(item)) => Command::Add(item.clone()),
        ("remove", Some(item)) => Command::Remove(item.clone()),
        ("checkout", None) => Command::Checkout,
        ("show", None) => Command::Show,
        _ => return Err(usage.into()),
    };
    let url = std::env::var("EVENTJOURNAL_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let mut builder = Client::builder(url);
    if let Ok(token) = std::env::var("EVENTJOURNAL_TOKEN") {
        builder = builder.bearer_token(token);
    }
    let client = builder.connect().await?;
    let settings = PersistenceSettings {
        snapshot_every: 3,
        keep_snapshots: 2,
        delete_events: false,
    };
    let (cart, handle) = ractor::Actor::spawn(
        None,
        PersistentActor::<ShoppingCart>::new(),
        (client, format!("cart|{cart_id}"), ShoppingCart, settings),
    )
    .await?;
    let reply = ask(&cart, command).await?;
    cart.stop(None);
    handle.await?;
    match reply {
        Ok(cart) => println!("{cart_id}: {cart}"),
        Err(refused) => return Err(refused.into()),
    }
    Ok(())
}
