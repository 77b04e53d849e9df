//! Images and availability groups.

use scaibunker_api::images::{AvailabilityGroup, CreateAvailabilityGroup, CreateImage, Image};

use crate::{Client, SdkError};

impl Client {
    /// Registers an image; upload its bytes with [`Client::upload_image_content`].
    pub async fn create_image(&self, req: &CreateImage) -> Result<Image, SdkError> {
        self.post("/images", req).await
    }

    /// Uploads an image's tarball or ext4 bytes (streamed), and waits while they are baked:
    /// the answer is the image `ready`, or an error saying why the content was refused.
    pub async fn upload_image_content(
        &self,
        id: &str,
        content: impl Into<reqwest::Body>,
    ) -> Result<Image, SdkError> {
        let rb = self
            .http
            .put(self.url(&format!("/images/{id}/content")))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(content);
        Self::data(self.send(rb).await?).await
    }

    /// One image with its per-worker cache states.
    pub async fn image(&self, id: &str) -> Result<Image, SdkError> {
        Self::data(
            self.send(self.http.get(self.url(&format!("/images/{id}"))))
                .await?,
        )
        .await
    }

    pub async fn images(&self) -> Result<Vec<Image>, SdkError> {
        Self::data(self.send(self.http.get(self.url("/images"))).await?).await
    }

    /// Asks the workers of the image's groups (all online workers if none) to fetch it.
    pub async fn warm_image(&self, id: &str) -> Result<Image, SdkError> {
        self.post(&format!("/images/{id}/warm"), &serde_json::json!({}))
            .await
    }

    pub async fn deactivate_image(&self, id: &str) -> Result<Image, SdkError> {
        self.post(&format!("/images/{id}/deactivate"), &serde_json::json!({}))
            .await
    }

    pub async fn create_availability_group(
        &self,
        req: &CreateAvailabilityGroup,
    ) -> Result<AvailabilityGroup, SdkError> {
        self.post("/availability-groups", req).await
    }

    /// Adds a worker (`member` = `workers`) or an image (`images`) to a group, which warms.
    pub async fn add_to_availability_group(
        &self,
        group_id: &str,
        member: &str,
        member_id: &str,
    ) -> Result<AvailabilityGroup, SdkError> {
        self.post(
            &format!("/availability-groups/{group_id}/{member}/{member_id}"),
            &serde_json::json!({}),
        )
        .await
    }
}
