//! COCO's sparse category ids and the model's class labels, in either label layout.

use std::collections::HashMap;

/// How a dataset's category ids become the model's class labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LabelLayout {
    /// Label `i` is the `i`-th category by id (detectron2): `n` categories give labels `0..n`.
    #[default]
    Contiguous,
    /// Label `id - 1` for category `id` (torchvision's COCO models, whose 91-way classifier is indexed by COCO
    /// category id): the labels run to the largest id, unused ids included.
    CategoryId,
}

/// COCO's sparse category ids mapped to model labels and back, in a [`LabelLayout`] (contiguous by default).
#[derive(Debug, Clone, PartialEq)]
pub struct CategoryMap {
    ids: Vec<u64>,
    names: Vec<String>,
    labels: HashMap<u64, i64>,
    layout: LabelLayout,
}

impl CategoryMap {
    /// Builds the contiguous map from `(id, name)` pairs in any order.
    pub fn new(categories: Vec<(u64, String)>) -> Self {
        Self::with_layout(categories, LabelLayout::Contiguous)
    }
    /// Builds the map from `(id, name)` pairs in any order. Under [`LabelLayout::CategoryId`] an id of 0 has no
    /// label.
    pub fn with_layout(mut categories: Vec<(u64, String)>, layout: LabelLayout) -> Self {
        categories.sort_by_key(|(id, _)| *id);
        let labels = match layout {
            LabelLayout::Contiguous => {
                categories.iter().enumerate().map(|(label, (id, _))| (*id, label as i64)).collect()
            }
            LabelLayout::CategoryId => {
                categories.iter().filter(|(id, _)| *id > 0).map(|(id, _)| (*id, *id as i64 - 1)).collect()
            }
        };
        let (ids, names) = categories.into_iter().unzip();
        CategoryMap { ids, names, labels, layout }
    }
    /// Number of labels the model must have: the category count, or the largest id under
    /// [`LabelLayout::CategoryId`].
    pub fn len(&self) -> usize {
        match self.layout {
            LabelLayout::Contiguous => self.ids.len(),
            LabelLayout::CategoryId => self.ids.last().copied().unwrap_or(0) as usize,
        }
    }
    /// True when there are no classes.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// How ids become labels.
    pub fn layout(&self) -> LabelLayout {
        self.layout
    }
    /// The label of a COCO category id.
    pub fn label(&self, category_id: u64) -> Option<i64> {
        self.labels.get(&category_id).copied()
    }
    /// The COCO category id of a label (none for a label no category has).
    pub fn category_id(&self, label: i64) -> Option<u64> {
        match self.layout {
            LabelLayout::Contiguous => usize::try_from(label).ok().and_then(|l| self.ids.get(l).copied()),
            LabelLayout::CategoryId => u64::try_from(label + 1).ok().filter(|id| self.labels.contains_key(id)),
        }
    }
    /// Name of a label's category.
    pub fn name(&self, label: i64) -> Option<&str> {
        let id = self.category_id(label)?;
        self.ids.iter().position(|&i| i == id).map(|i| self.names[i].as_str())
    }
    /// COCO ids in increasing order.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }
    /// Names in the order of [`CategoryMap::ids`].
    pub fn names(&self) -> &[String] {
        &self.names
    }
}
