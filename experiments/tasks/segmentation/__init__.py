"""Semantic segmentation: data (CIFAR-10 composites, Oxford-IIIT Pet), the U-Net,
metrics (mIoU), the task the loop trains, the sweep of runs and its report."""
