//! An array map of `u64` words that the program reads as a bitmap (`VIP_PORTS`, `BRIDGES`:
//! whether a hash lookup can hit at all), kept equal to a set the daemon computes, one word
//! write per word that changes.

use aya::maps::{Array, MapData};
use aya::Ebpf;

use super::bpf_map::{io, take, MapsError};

/// A bitmap map and what the daemon wrote into it.
pub struct BitMap {
    name: &'static str,
    map: Array<MapData, u64>,
    /// What the map holds, word by word.
    written: Vec<u64>,
}

impl BitMap {
    /// Takes map `name` (`len` words) out of `ebpf`, with the words it holds already (an
    /// unpinned map holds zeroes).
    ///
    /// Returns `Err(MapsError::Missing)` when the object lacks it or has it with another
    /// layout, `Err(MapsError::Io)` when it cannot be read.
    pub fn take(ebpf: &mut Ebpf, name: &'static str, len: u32) -> Result<BitMap, MapsError> {
        let map: Array<MapData, u64> = take(ebpf, name)?;
        let written = (0..len)
            .map(|word| map.get(&word, 0))
            .collect::<Result<_, _>>()
            .map_err(io(name))?;
        Ok(BitMap { name, map, written })
    }

    /// Makes the map hold exactly `bits`, each a (word, bit) pair; every other bit is cleared.
    /// A word is written whole, so a packet reads its old value or its new one. Writes only
    /// the words that change; a pair with a word outside the map is ignored.
    ///
    /// Returns `Err(MapsError::Io)` when a word cannot be written (those written before it
    /// stay written, and are remembered).
    pub fn write(&mut self, bits: impl IntoIterator<Item = (u32, u64)>) -> Result<(), MapsError> {
        let mut wanted = vec![0u64; self.written.len()];
        for (word, bit) in bits {
            if let Some(w) = wanted.get_mut(word as usize) {
                *w |= bit;
            }
        }
        for (word, (&want, had)) in wanted.iter().zip(&mut self.written).enumerate() {
            if want != *had {
                self.map.set(word as u32, want, 0).map_err(io(self.name))?;
                *had = want;
            }
        }
        Ok(())
    }
}
