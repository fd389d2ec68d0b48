//! COCO datasets, masks, transforms and augmentation, batching, samplers, the parallel loader and the synthetic
//! dataset used as the built-in default. Filled by the data issue.
