//! The compress stage. A compressor wraps the writer of the next stage (and, restoring, the
//! reader of the previous one); adding one is an enum variant and its two wrappers.

use std::io::{self, Read, Write};
use std::str::FromStr;

/// A writer that must be finished: flushes what it buffers and finishes the writers it wraps.
pub trait Finish: Write + Send {
    fn finish(self: Box<Self>) -> io::Result<()>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    Gzip,
    None,
}

impl FromStr for Compression {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "zstd" => Ok(Self::Zstd),
            "gzip" => Ok(Self::Gzip),
            "none" => Ok(Self::None),
            other => Err(format!("unknown compression {other:?}: zstd, gzip or none")),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Zstd => "zstd",
            Self::Gzip => "gzip",
            Self::None => "none",
        })
    }
}

impl Compression {
    /// The file name extension of what it writes.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Zstd => ".zst",
            Self::Gzip => ".gz",
            Self::None => "",
        }
    }
}

/// A stage's writer around the next stage's: finishing it finishes its own stream (`end`,
/// which hands back the next writer) and then the next one.
pub struct Layer<W> {
    writer: W,
    end: fn(W) -> io::Result<Box<dyn Finish>>,
}

impl<W: Write + Send + 'static> Layer<W> {
    pub fn boxed(writer: W, end: fn(W) -> io::Result<Box<dyn Finish>>) -> Box<dyn Finish> {
        Box::new(Self { writer, end })
    }
}

impl<W: Write + Send> Write for Layer<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

impl<W: Write + Send> Finish for Layer<W> {
    fn finish(self: Box<Self>) -> io::Result<()> {
        (self.end)(self.writer)?.finish()
    }
}

impl Compression {
    pub fn compress(self, output: Box<dyn Finish>) -> io::Result<Box<dyn Finish>> {
        Ok(match self {
            Self::Zstd => Layer::boxed(zstd::stream::write::Encoder::new(output, 3)?, |zstd| {
                zstd.finish()
            }),
            Self::Gzip => Layer::boxed(
                flate2::write::GzEncoder::new(output, flate2::Compression::default()),
                |gzip| gzip.finish(),
            ),
            Self::None => output,
        })
    }

    pub fn decompress(self, input: Box<dyn Read + Send>) -> io::Result<Box<dyn Read + Send>> {
        Ok(match self {
            Self::Zstd => Box::new(zstd::stream::read::Decoder::new(input)?),
            Self::Gzip => Box::new(flate2::read::GzDecoder::new(input)),
            Self::None => input,
        })
    }
}
