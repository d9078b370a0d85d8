//! Lower-case hex of bytes (hashes, MACs, random secrets). `hex::encode` builds its string a
//! `char` at a time (about 50 instructions a byte, measured with callgrind on the relay token's
//! two per admission); `hex::encode_to_slice` writes bytes into a buffer of the final size.
//! Likewise a new id is written with `uuid`'s encoder, not through `fmt` (`to_string`).

/// `bytes` as lower-case hex.
pub fn lower(bytes: impl AsRef<[u8]>) -> String {
    let bytes = bytes.as_ref();
    let mut out = vec![0u8; bytes.len() * 2];
    hex::encode_to_slice(bytes, &mut out).expect("the buffer is twice the input's length");
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// A new time-ordered id (UUIDv7) in its hyphenated lower-case form.
pub fn uuid_v7() -> String {
    uuid::Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut uuid::Uuid::encode_buffer())
        .to_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn it_is_what_hex_encode_gives() {
        for len in [0usize, 1, 8, 24, 32, 33] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(super::lower(&bytes), hex::encode(&bytes));
        }
        assert_eq!(super::lower([0x00, 0xab, 0xff]), "00abff");
    }

    #[test]
    fn a_new_id_is_a_version_7_uuid_as_to_string_writes_it() {
        let id = super::uuid_v7();
        let parsed = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
        assert_eq!(parsed.to_string(), id);
    }
}
