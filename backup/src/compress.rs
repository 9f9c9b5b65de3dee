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

struct Zstd(zstd::stream::write::Encoder<'static, Box<dyn Finish>>);
struct Gzip(flate2::write::GzEncoder<Box<dyn Finish>>);

impl Write for Zstd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Finish for Zstd {
    fn finish(self: Box<Self>) -> io::Result<()> {
        self.0.finish()?.finish()
    }
}

impl Write for Gzip {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Finish for Gzip {
    fn finish(self: Box<Self>) -> io::Result<()> {
        self.0.finish()?.finish()
    }
}

impl Compression {
    pub fn compress(self, output: Box<dyn Finish>) -> io::Result<Box<dyn Finish>> {
        Ok(match self {
            Self::Zstd => Box::new(Zstd(zstd::stream::write::Encoder::new(output, 3)?)),
            Self::Gzip => Box::new(Gzip(flate2::write::GzEncoder::new(
                output,
                flate2::Compression::default(),
            ))),
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
