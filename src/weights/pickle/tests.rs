use super::*;

fn str_key(p: &Pickle, kv: &(Id, Id)) -> String {
    p.str(kv.0).unwrap().to_string()
}

#[test]
fn parses_protocol2_dict_with_long_and_tuple() {
    // pickle.dumps({'a': (1, -2, 70000), 'b': 2**40}, protocol=2)
    let data: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01J\xfe\xff\xff\xffJp\x11\x01\x00\x87q\x02X\x01\x00\x00\x00bq\x03\x8a\x06\x00\x00\x00\x00\x00\x01u.";
    let (p, used) = load(data).unwrap();
    assert_eq!(used, data.len());
    let Value::Dict(items) = p.get(p.root()) else {
        panic!("not a dict: {:?}", p.get(p.root()));
    };
    assert_eq!(items.len(), 2);
    assert_eq!(str_key(&p, &items[0]), "a");
    let a: Vec<i64> = p
        .tuple(items[0].1)
        .unwrap()
        .iter()
        .map(|&i| p.int(i).unwrap())
        .collect();
    assert_eq!(a, vec![1, -2, 70000]);
    assert_eq!(str_key(&p, &items[1]), "b");
    assert_eq!(p.int(items[1].1), Some(1 << 40));
}

#[test]
fn truncated_input_is_an_error() {
    let data: &[u8] = b"\x80\x02}q\x00(X\x01\x00\x00";
    assert!(matches!(load(data), Err(PickleError::Truncated)));
    // A length prefix far past the end is truncation, not an allocation.
    let data: &[u8] = b"\x80\x04\x8d\xff\xff\xff\xff\xff\xff\xff\x7f";
    assert!(matches!(load(data), Err(PickleError::Truncated)));
}

/// A list memoised, then a list of two references to it, 40 times over: a deep copy
/// would hold 2^40 lists. Shared, it is 41 objects.
#[test]
fn a_memo_bomb_costs_one_index_per_reference() {
    let mut data = b"\x80\x02]q\x00".to_vec();
    for i in 1..=40u8 {
        data.extend_from_slice(&[b']', b'(', b'h', i - 1, b'h', i - 1, b'e', b'q', i]);
    }
    data.push(b'.');
    let (p, _) = load(&data).unwrap();
    assert_eq!(p.objects().len(), 41);
    let Value::List(top) = p.get(p.root()) else {
        panic!("not a list")
    };
    assert_eq!(top.len(), 2);
    assert_eq!(top[0], top[1], "both references are the same object");
}

/// Python semantics: an object memoised and then filled is seen filled through the memo.
#[test]
fn the_memo_sees_later_changes() {
    // d = {}; pickle.dumps([d, d]) where d gets an item after being memoised.
    let data: &[u8] = b"\x80\x02](}q\x00X\x01\x00\x00\x00kK\x07sh\x00e.";
    let (p, _) = load(data).unwrap();
    let Value::List(items) = p.get(p.root()) else {
        panic!("not a list")
    };
    assert_eq!(items.len(), 2);
    for &d in items {
        let Value::Dict(kv) = p.get(d) else {
            panic!("not a dict")
        };
        assert_eq!(kv.len(), 1);
        assert_eq!(p.int(kv[0].1), Some(7));
    }
}

/// Half a million nested lists: no recursion in parsing or dropping.
#[test]
fn deep_nesting_does_not_overflow_the_stack() {
    let depth = 500_000;
    let mut data = b"\x80\x02".to_vec();
    data.extend(std::iter::repeat_n(b']', depth));
    data.extend(std::iter::repeat_n(b'a', depth - 1));
    data.push(b'.');
    let (p, _) = load(&data).unwrap();
    assert_eq!(p.objects().len(), depth);
    drop(p);
}

#[test]
fn too_many_objects_are_refused() {
    let mut data = b"\x80\x02".to_vec();
    data.extend(std::iter::repeat_n(b'N', MAX_OBJECTS + 1));
    assert!(matches!(load(&data), Err(PickleError::TooManyObjects)));
}
