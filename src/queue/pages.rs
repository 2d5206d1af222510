//! A vector in fixed-size pages: it grows a page at a time, never by doubling and copying, so
//! a queue of a million messages holds a million slots plus at most one page, not up to twice
//! that (and no realloc moves a hundred megabytes at once).

/// Slots per page: 4096 slots of 80 bytes is 320 KiB, small next to a big queue and big enough
/// that the page table is tiny (250 pages for a million).
const PAGE_LEN: usize = 65536;

#[derive(Debug)]
pub struct Pages<T> {
    pages: Vec<Vec<T>>,
    len: usize,
}

impl<T> Default for Pages<T> {
    fn default() -> Self {
        Pages {
            pages: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Pages<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn push(&mut self, value: T) {
        if self.len.is_multiple_of(PAGE_LEN) {
            self.pages.push(Vec::with_capacity(PAGE_LEN));
        }
        if let Some(page) = self.pages.last_mut() {
            page.push(value);
        }
        self.len += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Remove the last value (its page goes when empty).
    pub fn pop(&mut self) -> Option<T> {
        let page = self.pages.last_mut()?;
        let value = page.pop()?;
        if page.is_empty() {
            self.pages.pop();
        }
        self.len -= 1;
        Some(value)
    }

    pub fn get(&self, i: usize) -> Option<&T> {
        self.pages.get(i / PAGE_LEN)?.get(i % PAGE_LEN)
    }

    pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.pages.get_mut(i / PAGE_LEN)?.get_mut(i % PAGE_LEN)
    }

    /// Grow to `len` with values from `f` (never shrinks).
    pub fn grow_to(&mut self, len: usize, mut f: impl FnMut() -> T) {
        while self.len < len {
            self.push(f());
        }
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &T> {
        self.pages.iter().flat_map(|p| p.iter())
    }

    pub fn iter_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut T> {
        self.pages.iter_mut().flat_map(|p| p.iter_mut())
    }
}

/// A binary min-heap kept in [`Pages`]: the retry schedule of a big queue without a doubling
/// vector's slack (up to half its memory just after it grows).
#[derive(Debug)]
pub struct MinHeap<T: Ord + Copy> {
    items: Pages<T>,
}

impl<T: Ord + Copy> Default for MinHeap<T> {
    fn default() -> Self {
        MinHeap {
            items: Pages::default(),
        }
    }
}

impl<T: Ord + Copy> MinHeap<T> {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn peek(&self) -> Option<T> {
        self.items.get(0).copied()
    }

    fn at(&self, i: usize) -> T {
        // Indices passed here are always in range; fall back to the top rather than panic.
        match self.items.get(i) {
            Some(v) => *v,
            None => self
                .items
                .get(0)
                .copied()
                .unwrap_or_else(|| unreachable_heap()),
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        let (va, vb) = (self.at(a), self.at(b));
        if let Some(x) = self.items.get_mut(a) {
            *x = vb;
        }
        if let Some(x) = self.items.get_mut(b) {
            *x = va;
        }
    }

    pub fn push(&mut self, value: T) {
        self.items.push(value);
        let mut i = self.items.len() - 1;
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.at(i) >= self.at(parent) {
                break;
            }
            self.swap(i, parent);
            i = parent;
        }
    }

    pub fn pop(&mut self) -> Option<T> {
        let top = self.peek()?;
        let last = self.items.pop()?;
        if self.items.is_empty() {
            return Some(top);
        }
        if let Some(x) = self.items.get_mut(0) {
            *x = last;
        }
        let n = self.items.len();
        let mut i = 0;
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut least = i;
            if l < n && self.at(l) < self.at(least) {
                least = l;
            }
            if r < n && self.at(r) < self.at(least) {
                least = r;
            }
            if least == i {
                break;
            }
            self.swap(i, least);
            i = least;
        }
        Some(top)
    }
}

fn unreachable_heap<T>() -> T {
    // Only reachable through an index bug; a panic names it rather than corrupting the order.
    panic!("heap index out of range")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_index_like_a_vector_and_grow_a_page_at_a_time() {
        let mut p = Pages::default();
        for i in 0..(PAGE_LEN * 2 + 5) {
            p.push(i);
        }
        assert_eq!(p.len(), PAGE_LEN * 2 + 5);
        assert_eq!(p.get(PAGE_LEN + 3), Some(&(PAGE_LEN + 3)));
        assert_eq!(p.get(PAGE_LEN * 3), None);
        *p.get_mut(7).expect("in range") = 70;
        assert_eq!(p.iter().nth(7), Some(&70));
        assert_eq!(p.pages.iter().map(Vec::capacity).max(), Some(PAGE_LEN));
        p.grow_to(PAGE_LEN * 3, || 0);
        assert_eq!(p.len(), PAGE_LEN * 3);
        assert_eq!(p.iter().rev().count(), PAGE_LEN * 3);
        for _ in 0..PAGE_LEN {
            p.pop();
        }
        assert_eq!(p.pages.len(), 2, "an empty page goes");
    }

    #[test]
    fn the_heap_pops_in_order() {
        let mut h = MinHeap::default();
        let mut x: u64 = 12345;
        let mut all = Vec::new();
        for _ in 0..(PAGE_LEN * 2 + 77) {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = x >> 40;
            all.push(v);
            h.push(v);
        }
        all.sort_unstable();
        let mut out = Vec::new();
        while let Some(v) = h.pop() {
            out.push(v);
        }
        assert_eq!(out, all);
        assert_eq!(h.peek(), None);
    }
}
